//! BENCHMARKS.md: the summary (one line per scenario), the machine and the run, how
//! CPU, cores and RSS are measured, then each scenario's section.

use std::fmt::Write as _;

use super::Scenario;
use super::targets::pass_str;

/// The whole of BENCHMARKS.md.
pub fn document(
    scenarios: &[Scenario],
    machine: &[(String, String)],
    info: &[(String, String)],
) -> String {
    let mode = info
        .iter()
        .find(|(k, _)| k == "mode")
        .map_or("?", |(_, v)| v.as_str());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# keymeter benchmarks\n\n\
         Written by `bench/run.sh --{mode}` (see [bench/README.md](bench/README.md) for what each scenario \
         measures and how to read it); the same figures are in [bench/results.json](bench/results.json). \
         Every ratio compares two measurements taken in the same run on the same cores; the machine is \
         shared, so absolute numbers move between runs while ratios are the comparable figures.\n"
    );
    md.push_str("## Summary\n\n| scenario | headline | required | result |\n|---|---:|---|---|\n");
    for s in scenarios {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            s.title,
            s.ratio.map_or("-".into(), |r| format!("{r:.2} ×")),
            s.target,
            pass_str(s.pass)
        );
    }
    md.push_str("\n## Machine and tools\n\n| | |\n|---|---|\n");
    for (k, v) in machine.iter().chain(info.iter()) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push_str(
        "\nCPU per request: user + system time from `/proc/PID/stat` used by each measured process \
         after the warm-up, divided by the requests of that period. CPU share: the same time over the \
         wall time (100 % = one core). Cores busy: `/proc/stat`, all processes of the machine, the idle \
         spinners excluded. Peak RSS: `VmHWM` from `/proc/PID/status`. Latency percentiles come from \
         h2load's per-request log (2xx only). See bench/README.md for how to read \"limited by\".\n",
    );
    for s in scenarios {
        let _ = write!(md, "\n## {}\n\n{}", s.title, s.markdown);
    }
    md
}
