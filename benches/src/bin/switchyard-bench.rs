//! `switchyard-bench`: the end-to-end harness. See `switchyard_benches::harness`.
//!
//! ```text
//! cargo build --release -p switchyard
//! cargo run --release --bin switchyard-bench -- [--quick] [--reps N] [--json FILE]
//!     [--only TESTS] [--dataplanes LIST] [--switchyard PATH] [--results-dir DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use switchyard_benches::harness::{self, report, sys, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = sys::install_signal_cleanup() {
        eprintln!("switchyard-bench: error: {e}");
        return ExitCode::from(1);
    }
    let res = harness::run(&args);
    // Whatever a failure left behind (normally nothing: each topology removes itself on drop).
    sys::cleanup_all();
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard-bench: error: {e}");
            return ExitCode::from(1);
        }
    };
    let cells = report::summarize(&res);
    print!("{}", report::terminal_table(&res, &cells));
    let dir = args
        .results_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"));
    let mut failed = false;
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("switchyard-bench: {}: {e}", dir.display());
        failed = true;
    }
    let chart = "switchyard-bench.svg";
    let json =
        serde_json::to_string_pretty(&report::to_json(&res, &cells)).unwrap_or_default() + "\n";
    // The chart, the table and the JSON of one run always go together (a JSON left from an
    // earlier run next to a newer table would not say which figures it holds).
    let mut outputs = vec![
        (dir.join(chart), report::svg(&res, &cells)),
        (
            dir.join("switchyard-bench.md"),
            report::markdown(&res, &cells, &format!("benches/results/{chart}")),
        ),
        (dir.join("switchyard-bench.json"), json.clone()),
    ];
    if let Some(path) = &args.json {
        outputs.push((path.clone(), json));
    }
    for (path, text) in outputs {
        match std::fs::write(&path, text) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("switchyard-bench: writing {}: {e}", path.display());
                failed = true;
            }
        }
    }
    let errors = cells
        .iter()
        .filter(|c| c.status.starts_with("error"))
        .count();
    if errors > 0 {
        eprintln!("switchyard-bench: {errors} figure(s) could not be measured (see above)");
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
