//! `report RESULTS.jsonl OUTDIR`: turns the suite's JSON lines into OUTDIR/REPORT.md and
//! its PNG charts (plotters). `cargo xtask bench report [--quick]` runs the suite, then
//! this.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use lb_bench::out;
use plotters::prelude::*;
use serde_json::Value;

type Rec = serde_json::Map<String, Value>;

fn f(r: &Rec, k: &str) -> f64 {
    r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}
fn s<'a>(r: &'a Rec, k: &str) -> &'a str {
    r.get(k).and_then(Value::as_str).unwrap_or("")
}
fn u(r: &Rec, k: &str) -> u64 {
    r.get(k).and_then(Value::as_u64).unwrap_or(0)
}
/// The VIP mode a throughput or flood row measured; rows from before stateless VIPs
/// existed have none and are conntrack.
fn vip(r: &Rec) -> &str {
    match s(r, "vip") {
        "" => "conntrack",
        v => v,
    }
}
/// "new" for SYN only, else the flow count.
fn flows_label(r: &Rec) -> String {
    if s(r, "mix") == "syn" {
        "new".into()
    } else {
        u(r, "flows").to_string()
    }
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    let bytes = fs::read(FONT)
        .with_context(|| format!("reading {FONT} (scripts/setup.sh installs fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))
}

type Series = (String, Vec<(f64, f64)>);

/// Lines with points; x on a log scale when `log_x`.
fn line_chart(
    path: &Path,
    title: &str,
    x: &str,
    y: &str,
    log_x: bool,
    series: &[Series],
) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(a, b) in pts {
        x0 = x0.min(a);
        x1 = x1.max(a);
        y1 = y1.max(b);
    }
    if x0 > x1 {
        bail!("{title}: no data");
    }
    let mut cb = ChartBuilder::on(&root);
    cb.caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let style = |i: usize| Palette99::pick(i).stroke_width(2);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x)
                .y_desc(y)
                .x_label_formatter(&|v| {
                    if *v >= 1000.0 {
                        format!("{:.0}k", v / 1000.0)
                    } else {
                        format!("{v:.0}")
                    }
                })
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, (name, p)) in series.iter().enumerate() {
                chart
                    .draw_series(LineSeries::new(p.iter().copied(), style(i)))?
                    .label(name.as_str())
                    .legend(move |(a, b)| PathElement::new(vec![(a, b), (a + 20, b)], style(i)));
                chart.draw_series(
                    p.iter()
                        .map(|&c| Circle::new(c, 4, Palette99::pick(i).filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }};
    }
    if log_x {
        draw!(cb.build_cartesian_2d((x0 * 0.7..x1 * 1.4).log_scale(), 0f64..y1 * 1.15)?);
    } else {
        let pad = (x1 - x0).max(1.0) * 0.05;
        draw!(cb.build_cartesian_2d(x0 - pad..x1 + pad, 0f64..y1 * 1.15)?);
    }
    root.present()?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series.
fn bar_chart(
    path: &Path,
    title: &str,
    y: &str,
    cats: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max);
    let n = cats.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, 0f64..ymax * 1.2)?;
    let labels = cats.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cats.len() * 2 + 1)
        .x_label_formatter(&|v| {
            let i = v.floor() as usize;
            if (v - v.floor() - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y)
        .label_style(("sans-serif", 13))
        .draw()?;
    let k = series.len() as f64;
    let w = 0.8 / k;
    for (j, (name, vals)) in series.iter().enumerate() {
        let color = Palette99::pick(j);
        chart
            .draw_series(
                vals.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| {
                        let x0 = i as f64 + 0.1 + j as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w * 0.95, v)], color.filled())
                    }),
            )?
            .label(name.as_str())
            .legend(move |(a, b)| Rectangle::new([(a, b - 5), (a + 15, b + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(results), Some(dir)) = (args.next(), args.next()) else {
        bail!("usage: report RESULTS.jsonl OUTDIR");
    };
    let dir = PathBuf::from(dir);
    fs::create_dir_all(&dir)?;
    register_font()?;
    let text = fs::read_to_string(&results).with_context(|| format!("reading {results}"))?;
    let mut by: BTreeMap<String, Vec<Rec>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{results}:{}", i + 1))?;
        let Value::Object(o) = v else { continue };
        by.entry(s(&o, "suite").to_string()).or_default().push(o);
    }
    let get = |k: &str| by.get(k).cloned().unwrap_or_default();
    let quick = Path::new(&results)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("quick"));
    let m = out::machine();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# Benchmark report\n")?;
    writeln!(
        w,
        "{} run of `cargo xtask bench report{}` at commit `{commit}`, {date}. Every number \
         below comes from that one run; baselines were measured in the same run with the same \
         settings. Machine: {} ({} cores), Linux {}, {} GiB RAM (a VM: the host steals CPU \
         in bursts, which is why the throughput suite takes turns and reports medians).\n",
        if quick { "Quick" } else { "Full" },
        if quick { " --quick" } else { "" },
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
        m["memory_gib"],
    )?;
    writeln!(
        w,
        "Reproduce: `cargo xtask bench report` (full, about 15 minutes) or `cargo xtask bench \
         report --quick` (under 5 minutes, into `bench/results/quick/`); one suite: `cargo xtask bench throughput` (also \
         `dataplane`, `haproxy`, `maglev`, `flood`, `control`, `health`); the generator alone: \
         `cargo xtask bench gen --help`. Raw results: `{}`.\n",
        Path::new(&results)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    )?;

    // ---- headline
    let tp = get("throughput");
    let hap = get("haproxy");
    writeln!(w, "## Headline\n")?;
    writeln!(w, "| measure | value |\n| --- | --- |")?;
    // Each conntrack row, then the same cell through the stateless VIP beside it.
    let same_cell = |a: &Rec, b: &Rec| {
        ["family", "flows"].iter().all(|k| u(a, k) == u(b, k))
            && ["mode", "mix"].iter().all(|k| s(a, k) == s(b, k))
    };
    let headline: Vec<&Rec> = tp
        .iter()
        .filter(|r| vip(r) == "conntrack")
        .flat_map(|r| {
            std::iter::once(r).chain(
                tp.iter()
                    .filter(move |x| vip(x) == "stateless" && same_cell(r, x)),
            )
        })
        .collect();
    for r in headline {
        let label = match (s(r, "mix"), u(r, "flows")) {
            ("established", 1000) => "established, 1,000 flows",
            ("syn", _) => "SYN only (every frame a new flow)",
            ("constant", _) => "one constant 5-tuple",
            ("established", 1_000_000) => "established, 1,000,000 flows",
            _ => continue,
        };
        writeln!(
            w,
            "| LB / forwarder, IPv{}, {label}, {}{} | {:.2}{} |",
            u(r, "family"),
            s(r, "mode"),
            if vip(r) == "stateless" {
                ", **stateless** VIP (GUE)"
            } else {
                ""
            },
            f(r, "ratio"),
            r.get("target")
                .and_then(Value::as_f64)
                .map(|t| format!(
                    " (target {t:.1}: {})",
                    if f(r, "ratio") >= t { "met" } else { "missed" }
                ))
                .unwrap_or_default()
        )?;
    }
    let st = get("stateless_targets");
    let verdicts: Vec<bool> = st
        .iter()
        .filter_map(|r| r.get("met").and_then(Value::as_bool))
        .collect();
    if !verdicts.is_empty() {
        writeln!(
            w,
            "| stateless targets met (flow count stops mattering; §1) | {} of {} |",
            verdicts.iter().filter(|&&m| m).count(),
            verdicts.len()
        )?;
    }
    let hp = |p: &str| hap.iter().find(|r| s(r, "path") == p);
    if let (Some(l), Some(h)) = (hp("lb"), hp("haproxy")) {
        writeln!(
            w,
            "| connections/s, lb / HAProxy | {:.2} ({:.0} / {:.0}) |",
            f(l, "cps") / f(h, "cps"),
            f(l, "cps"),
            f(h, "cps")
        )?;
        writeln!(
            w,
            "| p99 request latency, lb / HAProxy | {:.2} ({:.0} / {:.0} µs) |",
            f(l, "p99_us") / f(h, "p99_us"),
            f(l, "p99_us"),
            f(h, "p99_us")
        )?;
        writeln!(
            w,
            "| LB's own CPU per request, lb / HAProxy | {:.3} ({:.2} / {:.2} µs) |",
            f(l, "own_cpu_us_per_req") / f(h, "own_cpu_us_per_req"),
            f(l, "own_cpu_us_per_req"),
            f(h, "own_cpu_us_per_req")
        )?;
    }
    writeln!(w)?;

    // ---- 1. throughput
    writeln!(
        w,
        "## 1. Throughput through the LB and the baseline forwarder\n"
    )?;
    writeln!(
        w,
        "Generator (XDP program run by BPF_PROG_TEST_RUN in live-frames mode on CPU 0) → veth \
         → program under test (XDP on the LB namespace's veth, XDP_TX) → veth → receiver (XDP \
         tally, drop). The `lb` program (1,048,576-entry connection table, 65,537-slot rings, \
         one VIP over four IP-in-IP backends of weights 1-4) and the forwarder (swap MACs, \
         XDP_TX) take turns of 250,000 frames through the one XDP link; Mpps are medians over \
         turns, the ratio the median of each LB turn over the forwarder turn beside it. \
         *inline*: the LB runs in the generator's own softirq on CPU 0 (the rate is of the \
         whole pipeline); *split*: the LB veth's receive runs in a threaded NAPI bound to CPU 1 \
         (its capacity on its own core; the generator outruns it and the rest is dropped at the \
         veth, *lost*). *prog ns*: the program's own run time per packet from the kernel's \
         run-time statistics (passes of its own, the median of five of 50,000 frames; the \
         statistics add two clock reads to each run); *diff ns*: 1000/LB Mpps − 1000/forwarder Mpps. *miss*: packets that found no \
         connection-table entry and made one (a bare SYN makes none); for a stateless VIP, \
         the SYNs (counted as new flows, no entry made). Minimum-size frames (60 bytes IPv4, 74 IPv6).\n"
    )?;
    writeln!(
        w,
        "*VIP*: *conntrack* is the VIP as configured (connection table, IP in IP); \
         *stateless* is the same VIP switched to stateless (second chance): no \
         connection-table lookup or entry, each packet to its ring slot's primary with the \
         slot's secondary carried in a GUE variant 0 header. Every slot names a secondary \
         that is up, so every packet carries one (the expensive case). Stateless rows \
         therefore forward GUE, 12 (IPv4) / 24 (IPv6) header bytes more than conntrack's \
         IP in IP (UDP and the GUE header with the secondary's address), and their absolute \
         targets are relative ones (below).\n"
    )?;
    writeln!(
        w,
        "| IP | VIP | mix | flows | mode | LB Mpps | fwd Mpps | LB / fwd | target | LB prog ns | fwd prog ns | diff ns | miss | lost |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for r in &tp {
        let flows = flows_label(r);
        writeln!(
            w,
            "| v{} | {} | {} | {flows} | {} | {:.2} | {:.2} | **{:.2}** | {} | {:.0} | {:.0} | {:.0} | {:.1}% | {:.1}% |",
            u(r, "family"),
            vip(r),
            s(r, "mix"),
            s(r, "mode"),
            f(r, "lb_mpps"),
            f(r, "fwd_mpps"),
            f(r, "ratio"),
            r.get("target")
                .and_then(Value::as_f64)
                .map(|t| format!("{t:.1} {}", if f(r, "ratio") >= t { "met" } else { "missed" }))
                .unwrap_or_else(|| "-".into()),
            f(r, "lb_prog_ns"),
            f(r, "fwd_prog_ns"),
            f(r, "diff_ns"),
            f(r, "miss_rate") * 100.0,
            f(r, "lost") * 100.0
        )?;
    }
    writeln!(w)?;
    for mode in ["conntrack", "stateless"] {
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for r in tp.iter().filter(|r| vip(r) == mode) {
            if let Some(Value::Object(o)) = r.get("reasons") {
                for (k, v) in o {
                    *reasons.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                }
            }
        }
        if reasons.is_empty() {
            continue;
        }
        writeln!(
            w,
            "What the LB counted over all timed turns of the {mode} VIP, by reason: {}.\n",
            reasons
                .iter()
                .map(|(k, v)| format!("`{k}` {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    if !st.is_empty() {
        writeln!(
            w,
            "**Stateless targets** (flow count stops mattering), per family and mode: the \
             program's ns per packet (kernel run-time statistics) at 1,000,000 established \
             flows and SYN only within {}× the constant 5-tuple's, and the LB / forwarder \
             ratio there within {} of the ratio at 1,000 established flows. The conntrack \
             VIP's same figures beside them, for comparison (no target).\n",
            st.iter()
                .find(|r| s(r, "measure") == "prog ns")
                .map_or(f64::NAN, |r| f(r, "limit")),
            st.iter()
                .find(|r| s(r, "measure") != "prog ns")
                .map_or(f64::NAN, |r| f(r, "limit")),
        )?;
        writeln!(
            w,
            "| IP | mode | measure | at | stateless | reference | × / diff | verdict | conntrack | reference | × / diff |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        let fmt = |r: &Rec| {
            let ns = s(r, "measure") == "prog ns";
            let by = if ns {
                format!("{:.2}×", f(r, "factor"))
            } else {
                format!("{:+.2}", f(r, "diff"))
            };
            let (v, rf) = if ns {
                (
                    format!("{:.0}", f(r, "value")),
                    format!("{:.0}", f(r, "reference")),
                )
            } else {
                (
                    format!("{:.2}", f(r, "value")),
                    format!("{:.2}", f(r, "reference")),
                )
            };
            (v, rf, by)
        };
        for r in st.iter().filter(|r| vip(r) == "stateless") {
            let (v, rf, by) = fmt(r);
            let ct = st.iter().find(|c| {
                vip(c) == "conntrack"
                    && u(c, "family") == u(r, "family")
                    && ["mode", "measure", "mix"]
                        .iter()
                        .all(|k| s(c, k) == s(r, k))
            });
            let (cv, crf, cby) = ct.map(fmt).unwrap_or_default();
            writeln!(
                w,
                "| v{} | {} | {} (ref: {}) | {} | {v} | {rf} | {by} | {} | {cv} | {crf} | {cby} |",
                u(r, "family"),
                s(r, "mode"),
                s(r, "measure"),
                s(r, "reference_cell"),
                flows_label(r),
                match r.get("met").and_then(Value::as_bool) {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "-",
                }
            )?;
        }
        writeln!(w)?;
    }
    for fam in [4u64, 6] {
        let mut series = Vec::new();
        for mode in ["inline", "split"] {
            // The forwarder's turns beside the stateless cells measure the same thing
            // again: its series is the conntrack cells'.
            for (prog, key, v) in [
                ("LB", "lb_mpps", "conntrack"),
                ("LB stateless", "lb_mpps", "stateless"),
                ("forwarder", "fwd_mpps", "conntrack"),
            ] {
                let pts: Vec<(f64, f64)> = tp
                    .iter()
                    .filter(|r| u(r, "family") == fam && s(r, "mode") == mode && vip(r) == v)
                    .filter(|r| matches!(s(r, "mix"), "established" | "constant"))
                    .map(|r| (u(r, "flows") as f64, f(r, key)))
                    .collect();
                if !pts.is_empty() {
                    series.push((format!("{prog}, {mode}"), pts));
                }
            }
        }
        if !series.is_empty() {
            let name = format!("throughput_v{fam}.png");
            line_chart(
                &dir.join(&name),
                &format!("IPv{fam}: Mpps against established flows"),
                "flows (ACKs over flows the LB has seen; 1 = one constant 5-tuple)",
                "Mpps",
                true,
                &series,
            )?;
            writeln!(w, "![IPv{fam} throughput]({name})\n")?;
        }
    }
    for p in get("profile") {
        writeln!(
            w,
            "Target missed: where CPU {} (the LB's, split) spends its time during IPv{} {} traffic \
             ({} flows), `perf record -C {}` of LB-only turns, self time by symbol:\n",
            u(&p, "cpu"),
            u(&p, "family"),
            s(&p, "mix"),
            if s(&p, "mix") == "syn" { "new".to_string() } else { u(&p, "flows").to_string() },
            u(&p, "cpu")
        )?;
        writeln!(w, "| share | symbol |\n| --- | --- |")?;
        if let Some(Value::Array(top)) = p.get("top") {
            for t in top.iter().filter_map(Value::as_object).take(12) {
                writeln!(w, "| {:.1}% | `{}` |", f(t, "pct"), s(t, "sym"))?;
            }
        }
        writeln!(w)?;
    }

    // ---- 2. fixtures
    let dp = get("dataplane");
    if !dp.is_empty() {
        writeln!(w, "## 2. Per-packet cost fixtures\n")?;
        writeln!(
            w,
            "The `lb` program through BPF_PROG_TEST_RUN, `repeat = 1` per call, the kernel's own \
             duration, median over ≥ 20,000 calls, CPU 1; 1M-entry table, 65,537-slot rings, \
             {} flows (Katran's multiples measured the same way on this machine kind).\n",
            u(&dp[0], "flows")
        )?;
        writeln!(w, "| fixture | IPv4 ns | × floor | IPv6 ns | × floor | Katran | target |\n|---|---|---|---|---|---|---|")?;
        for r in &dp {
            let opt = |k: &str| {
                r.get(k)
                    .and_then(Value::as_f64)
                    .map_or("-".into(), |v| format!("{v:.1}×"))
            };
            writeln!(
                w,
                "| {} | {:.0} | {:.2}× | {:.0} | {:.2}× | {} | {} |",
                s(r, "fixture"),
                f(r, "ipv4_ns"),
                f(r, "ipv4_x_floor"),
                f(r, "ipv6_ns"),
                f(r, "ipv6_x_floor"),
                opt("katran_x"),
                opt("target_x")
            )?;
        }
        let cats: Vec<String> = dp
            .iter()
            .map(|r| s(r, "fixture").split(" (").next().unwrap_or("").to_string())
            .collect();
        bar_chart(
            &dir.join("fixtures.png"),
            "ns per packet by fixture (BPF_PROG_TEST_RUN)",
            "ns",
            &cats,
            &[
                ("IPv4".into(), dp.iter().map(|r| f(r, "ipv4_ns")).collect()),
                ("IPv6".into(), dp.iter().map(|r| f(r, "ipv6_ns")).collect()),
            ],
        )?;
        writeln!(w, "\n![fixtures](fixtures.png)\n")?;
        let sw = get("dataplane_sweep");
        writeln!(w, "Established and new-flow cost against the number of flows (a CPU's share of the 1M-entry table is 1M / CPUs: per-CPU LRU lists):\n")?;
        writeln!(w, "| flows | established IPv4 ns | IPv6 ns | new flow IPv4 ns | IPv6 ns |\n|---|---|---|---|---|")?;
        for r in &sw {
            writeln!(
                w,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                u(r, "flows"),
                f(r, "ipv4_ns"),
                f(r, "ipv6_ns"),
                f(r, "ipv4_new_ns"),
                f(r, "ipv6_new_ns")
            )?;
        }
        if !sw.is_empty() {
            let ser = |k: &str| sw.iter().map(|r| (u(r, "flows") as f64, f(r, k))).collect();
            line_chart(
                &dir.join("fixtures_by_flows.png"),
                "ns per packet against flows (BPF_PROG_TEST_RUN)",
                "flows",
                "ns",
                true,
                &[
                    ("established IPv4".into(), ser("ipv4_ns")),
                    ("established IPv6".into(), ser("ipv6_ns")),
                    ("new flow IPv4".into(), ser("ipv4_new_ns")),
                    ("new flow IPv6".into(), ser("ipv6_new_ns")),
                ],
            )?;
            writeln!(w, "\n![fixtures by flows](fixtures_by_flows.png)\n")?;
        }
    }

    // ---- 3. haproxy
    if !hap.is_empty() {
        writeln!(w, "## 3. Against HAProxy\n")?;
        let h = hp("haproxy");
        writeln!(
            w,
            "The namespace testbed: one client, the LB namespace, three backends with real HTTP \
             servers. *lb*: the agent with an IP-in-IP VIP, backends answer the client directly \
             (DSR). *HAProxy* ({}): `mode tcp`, `balance roundrobin`, listening in the LB \
             namespace on another address of the VIP range. Same client (ours: {} workers, each \
             a new connection per request, `GET /`, `Connection: close`), taking turns, {} \
             rounds of {} s, medians. *machine CPU*: every CPU's busy time over the run per \
             request (client and servers included: the same for both); *LB's own CPU*: \
             HAProxy's process time, or the `lb` XDP program's run time (kernel statistics on \
             for both).\n",
            h.map(|h| s(h, "version")).unwrap_or("?"),
            h.map(|h| u(h, "workers")).unwrap_or(0),
            h.map(|h| u(h, "rounds")).unwrap_or(0),
            h.map(|h| f(h, "seconds")).unwrap_or(0.0),
        )?;
        writeln!(w, "| path | connections/s | p50 µs | p99 µs | errors | machine CPU µs/req | LB's own CPU µs/req |\n|---|---|---|---|---|---|---|")?;
        for r in &hap {
            writeln!(
                w,
                "| {} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.2} |",
                s(r, "path"),
                f(r, "cps"),
                f(r, "p50_us"),
                f(r, "p99_us"),
                u(r, "errors"),
                f(r, "cpu_us_per_req"),
                f(r, "own_cpu_us_per_req")
            )?;
        }
        let paths: Vec<String> = hap.iter().map(|r| s(r, "path").to_string()).collect();
        bar_chart(
            &dir.join("haproxy_cps.png"),
            "connections per second (a new connection per request)",
            "connections/s",
            &paths,
            &[(
                "connections/s".into(),
                hap.iter().map(|r| f(r, "cps")).collect(),
            )],
        )?;
        bar_chart(
            &dir.join("haproxy_latency.png"),
            "request latency, connect to last byte",
            "µs",
            &paths,
            &[
                ("p50".into(), hap.iter().map(|r| f(r, "p50_us")).collect()),
                ("p99".into(), hap.iter().map(|r| f(r, "p99_us")).collect()),
            ],
        )?;
        writeln!(
            w,
            "\n![lb vs HAProxy: connections/s](haproxy_cps.png)\n\n![lb vs HAProxy: latency](haproxy_latency.png)\n"
        )?;
    }

    // ---- 4. maglev
    let mg = get("maglev");
    if !mg.is_empty() {
        writeln!(w, "## 4. Maglev\n")?;
        writeln!(w, "Our weighted Maglev (`lb_userspace::maglev::build`), one CPU, median of builds; the paper's figures are for N = 1,000. *Balance*: the largest share over the ideal share. *Disruption*: slots whose backend changed when one backend leaves or joins, over the ideal 1/N.\n")?;
        writeln!(w, "| M | N | build ms | paper ms | balance | leave: moved | × ideal | join: moved | × ideal |\n|---|---|---|---|---|---|---|---|---|")?;
        for r in mg
            .iter()
            .filter(|r| r.get("weighted") == Some(&Value::Bool(false)))
        {
            writeln!(
                w,
                "| {} | {} | {:.2} | {} | {:.4} | {:.3}% | {:.2}× | {:.3}% | {:.2}× |",
                u(r, "m"),
                u(r, "n"),
                f(r, "build_ms"),
                r.get("paper_ms")
                    .and_then(Value::as_f64)
                    .map_or("-".into(), |v| format!("{v}")),
                f(r, "balance"),
                f(r, "leave_moved") * 100.0,
                f(r, "leave_x_ideal"),
                f(r, "join_moved") * 100.0,
                f(r, "join_x_ideal")
            )?;
        }
        writeln!(w, "\nWeighted (weights 1, 2, 3, 4 repeating, M = 65,537; balance against each backend's weighted share; one backend's weight 4 → 1):\n")?;
        writeln!(
            w,
            "| N | build ms | balance | moved by the weight change |\n|---|---|---|---|"
        )?;
        for r in mg
            .iter()
            .filter(|r| r.get("weighted") == Some(&Value::Bool(true)))
        {
            writeln!(
                w,
                "| {} | {:.2} | {:.4} | {:.3}% |",
                u(r, "n"),
                f(r, "build_ms"),
                f(r, "balance"),
                f(r, "weight_change_moved") * 100.0
            )?;
        }
        let mut series = Vec::new();
        for m in [65_537u64, 655_373] {
            let rows: Vec<&Rec> = mg
                .iter()
                .filter(|r| u(r, "m") == m && r.get("weighted") == Some(&Value::Bool(false)))
                .collect();
            series.push((
                format!("leave, moved × ideal, M={m}"),
                rows.iter()
                    .map(|r| (u(r, "n") as f64, f(r, "leave_x_ideal")))
                    .collect(),
            ));
            series.push((
                format!("balance, M={m}"),
                rows.iter()
                    .map(|r| (u(r, "n") as f64, f(r, "balance")))
                    .collect(),
            ));
        }
        line_chart(
            &dir.join("maglev.png"),
            "Maglev balance and disruption against N",
            "backends N",
            "× ideal",
            true,
            &series,
        )?;
        writeln!(w, "\n![maglev](maglev.png)\n")?;
    }

    // ---- 5. flood
    let fl = get("flood");
    if !fl.is_empty() {
        writeln!(w, "## 5. SYN flood\n")?;
        writeln!(
            w,
            "{} established IPv4 flows while SYNs of new flows arrive, {} in all = 10 × the \
             {}-entry connection table, through `lb` on the live wire (inline). *talking*: each \
             established flow sends a packet every tenth of a table turnover; *idle*: none \
             during the flood. Each flow's backend is read before and after by running its next \
             packet through the program. *conntrack*: the VIP as configured (IP in IP; a bare \
             SYN makes no entry), backend kept = the same backend after as before. \
             *stateless*: the same VIP switched to stateless (GUE; no table, so no entries: \
             the count of its flows' entries is shown, 0 expected), backend kept = the same \
             backend *and* the same secondary; no weight-change row, as a weight change \
             legitimately moves a stateless VIP's slots (their connections survive by the \
             second chance on the backends, not measured here).\n",
            u(&fl[0], "established"),
            u(&fl[0], "flood"),
            u(&fl[0], "table")
        )?;
        writeln!(
            w,
            "| VIP | established flows | backends | entries kept | backend kept |\n|---|---|---|---|---|"
        )?;
        for r in &fl {
            let entries = match r.get("entries_kept").and_then(Value::as_f64) {
                Some(e) => format!("{:.2}%", e * 100.0),
                None => format!("none (no table; {} entries)", u(r, "entries")),
            };
            writeln!(
                w,
                "| {} | {} | {} | {entries} | {:.2}% |",
                vip(r),
                s(r, "flows"),
                s(r, "backends"),
                f(r, "backend_kept") * 100.0
            )?;
        }
        writeln!(w)?;
    }

    // ---- 6. control plane
    let ct = get("control");
    let ag = get("control_agent");
    let mm = get("map_memory");
    let hc = get("health_cost");
    let hf = get("health_failover");
    if !(ct.is_empty() && ag.is_empty() && mm.is_empty() && hc.is_empty() && hf.is_empty()) {
        writeln!(w, "## 6. Control plane\n")?;
    }
    if !ct.is_empty() {
        writeln!(w, "Ring installation (M = 65,537, 100 backends):\n")?;
        writeln!(
            w,
            "| operation | runs | median ms | p99 ms |\n|---|---|---|---|"
        )?;
        for r in &ct {
            writeln!(
                w,
                "| {} | {} | {:.3} | {:.3} |",
                s(r, "measure"),
                u(r, "runs"),
                f(r, "median_ms"),
                f(r, "p99_ms")
            )?;
        }
        writeln!(w)?;
    }
    for r in &ag {
        writeln!(
            w,
            "The agent with {} VIPs × {} backends: startup to answering {:.0} ms, idle RSS {:.1} MB, peak {:.1} MB.\n",
            u(r, "vips"),
            u(r, "backends_per_vip"),
            f(r, "startup_ms"),
            f(r, "rss_mb"),
            f(r, "peak_rss_mb")
        )?;
    }
    if !mm.is_empty() {
        writeln!(
            w,
            "Kernel memory per map (memlock from fdinfo, and the formula's prediction):\n"
        )?;
        writeln!(
            w,
            "| map | entries | value bytes | measured | predicted |\n|---|---|---|---|---|"
        )?;
        let mut total = 0;
        for r in &mm {
            total += u(r, "measured_bytes");
            writeln!(
                w,
                "| {} | {} | {} | {:.2} MB | {} |",
                s(r, "map"),
                u(r, "entries"),
                u(r, "value_size"),
                u(r, "measured_bytes") as f64 / 1e6,
                r.get("predicted_bytes")
                    .and_then(Value::as_u64)
                    .map_or("-".into(), |p| format!("{:.2} MB", p as f64 / 1e6))
            )?;
        }
        writeln!(w, "| total | | | {:.2} MB | |\n", total as f64 / 1e6)?;
    }
    if !hc.is_empty() {
        writeln!(w, "Health checking 1,000 backends (tcp every 1 s, timeout 1 s, rise 2, fall 3), same servers for every checker:\n")?;
        writeln!(w, "| checker | CPU % of a core | probes/s | RSS MB | peak RSS MB |\n|---|---|---|---|---|")?;
        for r in &hc {
            writeln!(
                w,
                "| {} | {:.2} | {:.0} | {:.1} | {:.1} |",
                s(r, "checker"),
                f(r, "cpu_pct"),
                f(r, "probes_per_s"),
                f(r, "rss_mb"),
                f(r, "peak_rss_mb")
            )?;
        }
        writeln!(w)?;
    }
    if !hf.is_empty() {
        writeln!(
            w,
            "Induced backend failure to the VIP's live ring without it (target p99 ≤ {:.0} ms):\n",
            f(&hf[0], "target_ms")
        )?;
        writeln!(
            w,
            "| failure | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|"
        )?;
        for r in &hf {
            writeln!(
                w,
                "| {} | {} | {:.0} | {:.0} | {:.0} |",
                s(r, "failure"),
                u(r, "n"),
                f(r, "p50_ms"),
                f(r, "p99_ms"),
                f(r, "max_ms")
            )?;
        }
        writeln!(w)?;
    }
    let path = dir.join("REPORT.md");
    fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
