use clap::Parser;

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`road info | head`) panics; a CLI
    // should end quietly there, as other tools do. Runs killed this way are left RUNNING with a
    // dead pid, which reads as crashed and resumes with `road run --resume`.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // glibc serves blocks above its mmap threshold (128 KiB, adapting upward) from fresh
    // mappings and unmaps them on free, so every step's activations (candle allocates a tensor
    // per op) are page-faulted and zeroed by the kernel again: 15% of a fine-tuning step in a
    // profile. Keeping blocks up to 32 MiB (glibc's cap) in the heap, untrimmed, reuses them.
    #[cfg(all(unix, target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
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
