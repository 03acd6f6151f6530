//! `lb`: the load balancer's agent and CLI (the agent arrives with issue 2/6).
fn main() -> anyhow::Result<()> {
    let dp = lb_userspace::dataplane::Dataplane::load(Default::default())?;
    println!(
        "lb: object loaded and verified ({} VIPs max)",
        dp.sizes.max_vips
    );
    Ok(())
}
