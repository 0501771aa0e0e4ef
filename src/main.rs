use clap::Parser;

fn main() {
    road_dii::pin_thread_count();
    let cli = road_dii::cli::Cli::parse();
    if let Err(e) = road_dii::cli::run(cli) {
        // One line per cause, no backtrace: errors here are the user's to act on.
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
