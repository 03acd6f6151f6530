//! Build (once) the earlier releases the migration tests upgrade from, and print where
//! their `lb` binaries are. `cargo xtask test` runs it before the tests, so that the
//! build does not compete with timing-sensitive tests for the CPUs.
fn main() -> anyhow::Result<()> {
    println!(
        "{}",
        lb_tests::legacy::lb_at(lb_tests::legacy::V1)?.display()
    );
    Ok(())
}
