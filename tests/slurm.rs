//! `road submit` on a real single-node Slurm (not a mock): a private munged, slurmctld and slurmd
//! on 127.0.0.1 with a config, state, spool and logs in a temp folder this test owns (free ports,
//! its own munge socket, so nothing else on the machine is touched), run in the foreground as
//! background processes (no systemd). A 4-task array of experiments/tiny-equality-das.toml; task
//! 1 is cancelled (`scancel`, SIGTERM) after its first cell is stored, so its second cell is cut,
//! and task 2 is requeued (`scontrol requeue`, as a pre-emption does) at the same point and
//! resumes by itself; the array's merge job is cancelled by Slurm (kill_invalid_depend, task 1
//! can no longer succeed); `road submit --tasks 1` resubmits task 1, which resumes its shard
//! (one cell kept, one redone), and its merge job joins the shards. The merged folder must equal an unsharded `road run` of the same spec
//! (`common::assert_same_outputs`). Facts behind the config: ../shared/docs/SLURM.md.
//!
//! Slurm must be installed (`.ci/run` installs it: `apt-get install -y slurm-wlm munge`); without
//! it this test fails saying so, and if the daemons do not come up it fails with their logs.
mod common;
use common::{assert_same_outputs, only_run};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SPEC: &str = "experiments/tiny-equality-das.toml";
/// 2 layers x 4 positions = 8 cells, 2 per shard (task 1 runs cells 1 and 5): enough to kill a
/// task between its cells and see one kept and one redone.
const POSITIONS: &str = "sites.positions=[\"a\",\"b\",\"c\",\"d\"]";
/// Cells long enough that a task's second cell is still training when the test acts on its
/// first (at the file's 300 steps, faster kernels let task 2 finish both cells while task 1 was
/// being cancelled).
const STEPS: &str = "train.steps=1200";
const NODE: &str = "road-test-node";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A program on PATH or in the sbin folders Debian puts the daemons in.
fn find(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from)).map(|d| d.join(prog)).find(|p| p.is_file())
}

fn need(prog: &str) -> PathBuf {
    find(prog).unwrap_or_else(|| {
        panic!("{prog} not found: this test needs Slurm and munge on this machine. Install them with `apt-get install -y slurm-wlm munge` (as root, or with sudo); .ci/run does it when they are missing")
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn tail(p: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The daemons of one test cluster; dropping it (also while a failed assertion unwinds) cancels
/// every job, waits for the queue to drain (else slurmstepd processes linger), shuts the
/// controller down and ends the processes this test started.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        for p in ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo"] {
            need(p);
        }
        let _ = std::fs::remove_dir_all(dir);
        for sub in ["state", "spool", "log", "munge"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        // munged refuses a key others can read, and a socket folder others can write.
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = dir.join("munge/munge.key");
        let mut bytes = vec![0u8; 1024];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
        std::fs::write(&key, &bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let socket = dir.join("munge/munge.sock");
        let user = sh("id -un");
        // The controller must be named by this machine's short host name; the node need not be.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim().split('.').next().unwrap_or_default().to_string();
        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=roadtest\n\
                 SlurmctldHost={host}(127.0.0.1)\n\
                 SlurmctldPort={ctld_port}\n\
                 SlurmdPort={slurmd_port}\n\
                 AuthType=auth/munge\n\
                 CredType=cred/munge\n\
                 # A requeued task may run again after cred_expire seconds (default 120).\n\
                 AuthInfo=socket={socket},cred_expire=10\n\
                 SlurmUser={user}\n\
                 SlurmdUser={user}\n\
                 StateSaveLocation={d}/state\n\
                 SlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\n\
                 SlurmdLogFile={d}/log/slurmd.log\n\
                 # No cgroups, accounting or MPI: nothing outside this folder is needed.\n\
                 ProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\n\
                 MpiDefault=none\n\
                 SelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core\n\
                 # A merge job whose afterok can no longer be met is cancelled, not left waiting.\n\
                 DependencyParameters=kill_invalid_depend\n\
                 MailProg=/bin/true\n\
                 # The node line below, not the hardware, says what the node has.\n\
                 SlurmdParameters=config_overrides\n\
                 ReturnToService=2\n\
                 # Finished jobs stay visible to scontrol for their final state.\n\
                 MinJobAge=600\n\
                 KillWait=5\n\
                 NodeName={NODE} NodeAddr=127.0.0.1 CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN\n\
                 PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n",
                socket = socket.display()
            ),
        )
        .unwrap();
        let mut c = Cluster { dir: dir.to_path_buf(), conf, daemons: Vec::new() };
        let log = |name: &str| std::fs::File::create(dir.join("log").join(name)).unwrap();
        let spawn = |c: &mut Cluster, name: &'static str, prog: &str, args: &[String]| {
            let child = Command::new(need(prog)).args(args).stdout(log(&format!("{name}.out"))).stderr(log(&format!("{name}.err"))).spawn();
            let child = child.unwrap_or_else(|e| panic!("cannot start {prog}: {e}"));
            c.daemons.push((name, child));
        };
        let m = |f: &str| format!("{d}/munge/{f}");
        spawn(
            &mut c,
            "munged",
            "munged",
            &["-F".into(), "--force".into(), "--origin=127.0.0.1".into(), format!("--socket={}", socket.display()), format!("--key-file={}", key.display()), format!("--pid-file={}", m("munged.pid")), format!("--log-file={}", m("munged.log")), format!("--seed-file={}", m("munged.seed"))],
        );
        c.wait_for("munged to create its socket", Duration::from_secs(10), |_| socket.exists());
        let conf_arg = c.conf.display().to_string();
        spawn(&mut c, "slurmctld", "slurmctld", &["-D".into(), "-i".into(), "-f".into(), conf_arg.clone()]);
        c.wait_for("slurmctld to answer scontrol ping", Duration::from_secs(20), |c| c.out("scontrol", &["ping"]).contains("is UP"));
        spawn(&mut c, "slurmd", "slurmd", &["-D".into(), "-N".into(), NODE.into(), "-f".into(), conf_arg]);
        c.wait_for("the node to be idle", Duration::from_secs(20), |c| c.out("sinfo", &["-h", "-N", "-o", "%T"]) == "idle");
        c
    }

    /// A Slurm client command for this cluster (no SLURM_* from an enclosing job leaks in).
    fn cmd(&self, prog: &Path) -> Command {
        let mut cmd = Command::new(prog);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SLURM_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    fn out(&self, prog: &str, args: &[&str]) -> String {
        match self.cmd(&need(prog)).args(args).stderr(Stdio::null()).output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Err(_) => String::new(),
        }
    }

    /// Everything a failure report needs: the daemons' logs and what they printed.
    fn logs(&self) -> String {
        let mut s = String::new();
        for (name, _) in &self.daemons {
            for ext in ["out", "err"] {
                s.push_str(&format!("--- {name}.{ext}\n{}\n", tail(&self.dir.join(format!("log/{name}.{ext}")), 20)));
            }
        }
        for f in ["log/slurmctld.log", "log/slurmd.log", "munge/munged.log"] {
            s.push_str(&format!("--- {f}\n{}\n", tail(&self.dir.join(f), 40)));
        }
        s
    }

    /// Poll `ok` until it holds; past `timeout`, fail with the daemons' logs (a daemon that died
    /// is named at once).
    fn wait_for(&mut self, what: &str, timeout: Duration, ok: impl Fn(&Cluster) -> bool) {
        let t0 = Instant::now();
        while !ok(self) {
            for (name, child) in &mut self.daemons {
                if let Ok(Some(st)) = child.try_wait() {
                    let name = *name;
                    panic!("waiting for {what}: {name} exited ({st})\n{}", self.logs());
                }
            }
            if t0.elapsed() > timeout {
                panic!("waiting for {what}: not within {timeout:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether job `id` (or any task of it) is still pending, running or completing.
    fn queued(&self, id: &str) -> bool {
        !self.out("squeue", &["-h", "-t", "PD,R,CG,CF,RQ,S", "-j", id]).is_empty()
    }

    /// `JobState=` of a finished job (kept MinJobAge seconds).
    fn state(&self, id: &str) -> String {
        let show = self.out("scontrol", &["show", "job", id]);
        show.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).unwrap_or("?").to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let jobs = self.out("squeue", &["-h", "-o", "%A"]);
        for j in jobs.lines().filter(|l| !l.trim().is_empty()) {
            let _ = self.cmd(&need("scancel")).arg(j.trim()).status();
        }
        let t0 = Instant::now();
        while !self.out("squeue", &["-h"]).is_empty() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.cmd(&need("scontrol")).arg("shutdown").stderr(Stdio::null()).status();
        let t0 = Instant::now();
        for (_, child) in self.daemons.iter_mut().rev() {
            while matches!(child.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `key value` lines `road submit` prints.
fn field(out: &str, key: &str) -> String {
    out.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).unwrap_or_else(|| panic!("no {key:?} in {out:?}"))
}

/// `road submit` of the test's sweep (run id `sweep`): (array job id, merge job id).
fn submit(cluster: &Cluster, spec: &str, out_root: &Path, extra: &[&str]) -> (String, String) {
    let mut cmd = cluster.cmd(Path::new(env!("CARGO_BIN_EXE_road")));
    cmd.args(["submit", spec, "--set", POSITIONS, "--set", STEPS, "--shards", "4", "--run-id", "sweep", "--time", "5:00"]).args(extra);
    let o = cmd.env("ROAD_OUT", out_root).current_dir(root()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "road submit: {}\n{}", String::from_utf8_lossy(&o.stderr), cluster.logs());
    (field(&out, "array job "), field(&out, "merge job "))
}

#[test]
fn submit_cancel_resubmit_and_merge_on_a_real_slurm_equals_the_unsharded_run() {
    let t_start = Instant::now();
    let dir = std::env::temp_dir().join(format!("road-slurm-{}", std::process::id()));
    let mut cluster = Cluster::start(&dir.join("cluster"));
    let t_up = t_start.elapsed();

    // The reference: the same spec, unsharded.
    let spec = root().join(SPEC).display().to_string();
    let whole = dir.join("whole");
    let o = Command::new(env!("CARGO_BIN_EXE_road")).args(["run", &spec, "--set", POSITIONS, "--set", STEPS]).env("ROAD_OUT", &whole).current_dir(root()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let unsharded = only_run(&whole, "tiny-equality-das");
    let t_unsharded = t_start.elapsed() - t_up;

    let out_root = dir.join("split");
    let run = out_root.join("tiny-equality-das/sweep");
    let shard1 = run.join("shards/1-of-4");
    let t0 = Instant::now();
    let (array, merge) = submit(&cluster, &spec, &out_root, &[]);

    // Task 1 runs cells 1 then 5: cancel it once cell 1 is stored, while cell 5 trains. Task 2
    // runs cells 2 then 6: requeue it (what a pre-emption with requeue does) once cell 2 is
    // stored; Slurm runs it again by itself, as the same job, and it resumes its shard. The tasks
    // run side by side, so both are watched in one loop and each is acted on as soon as its first
    // cell lands (waiting for task 1 first let task 2 finish both cells on a loaded machine).
    let shard2 = run.join("shards/2-of-4");
    let (cancelled, requeued) = (std::cell::Cell::new(false), std::cell::Cell::new(false));
    cluster.wait_for("tasks 1 and 2 to store their first cells", Duration::from_secs(120), |c| {
        if !cancelled.get() && shard1.join("cells/1.toml").exists() {
            assert!(!shard1.join("cells/5.toml").exists(), "task 1 finished before it could be cancelled");
            let o = c.cmd(&need("scancel")).arg(format!("{array}_1")).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            cancelled.set(true);
        }
        if !requeued.get() && shard2.join("cells/2.toml").exists() {
            assert!(!shard2.join("cells/6.toml").exists(), "task 2 finished before it could be requeued");
            let o = c.cmd(&need("scontrol")).args(["requeue", &format!("{array}_2")]).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            requeued.set(true);
        }
        cancelled.get() && requeued.get()
    });
    cluster.wait_for("the first array (with task 2 rerun) and its merge job to leave the queue", Duration::from_secs(120), |c| {
        !c.queued(&array) && !c.queued(&merge)
    });
    let t_first = t0.elapsed();
    // --open-mode=append: the log holds both runs of the requeued task.
    let log2 = std::fs::read_to_string(run.join(format!("slurm/{array}_2.out"))).unwrap_or_default();
    assert!(log2.contains("resuming: 1 of 2 cells left") && log2.matches("finished earlier, kept").count() == 1, "the requeued task must keep cell 2 and redo cell 6:\n{log2}");
    for i in [0, 2, 3] {
        assert_eq!(cluster.state(&format!("{array}_{i}")), "COMPLETED", "task {i}\n{}", tail(&run.join(format!("slurm/{array}_{i}.out")), 30));
    }
    assert_eq!(cluster.state(&format!("{array}_1")), "CANCELLED");
    assert_eq!(cluster.state(&merge), "CANCELLED", "an afterok merge job whose task was cancelled must not run");
    // The SIGTERM stopped task 1 between steps: the folder says so, and the cut cell is not stored.
    assert!(shard1.join("INCOMPLETE").exists() && !shard1.join("RUNNING").exists());
    assert!(!shard1.join("cells/5.toml").exists() && !run.join("metrics.csv").exists());

    // Resubmit task 1 alone (it sees SLURM_ARRAY_TASK_COUNT=1: the script's ROAD_SHARD_COUNT
    // keeps it shard 1/4) with a merge job after it.
    let t1 = Instant::now();
    let (array2, merge2) = submit(&cluster, &spec, &out_root, &["--tasks", "1"]);
    cluster.wait_for("the resubmitted task and its merge job", Duration::from_secs(90), |c| !c.queued(&array2) && !c.queued(&merge2));
    let t_resume = t1.elapsed();
    let log = std::fs::read_to_string(run.join(format!("slurm/{array2}_1.out"))).unwrap_or_default();
    assert_eq!(cluster.state(&format!("{array2}_1")), "COMPLETED", "{log}");
    assert_eq!(cluster.state(&merge2), "COMPLETED", "{}", tail(&run.join(format!("slurm/merge-{merge2}.out")), 20));
    let kept = log.matches("finished earlier, kept").count();
    assert!(log.contains("resuming: 1 of 2 cells left") && kept == 1, "the resumed task must keep cell 1 and redo cell 5:\n{log}");

    assert_same_outputs(&unsharded, &run);
    drop(cluster);
    let total = t_start.elapsed();
    eprintln!(
        "slurm test: cluster up {:.1}s, unsharded run {:.1}s, 4-task array with task 1 cancelled and task 2 requeued {:.1}s, resubmit task 1 + resume + merge {:.1}s, total {:.1}s; task 1 (resubmitted) and task 2 (requeued) each kept {kept} cell and redid 1 (of their 2), tasks 0 and 3 ran once",
        t_up.as_secs_f64(),
        t_unsharded.as_secs_f64(),
        t_first.as_secs_f64(),
        t_resume.as_secs_f64(),
        total.as_secs_f64()
    );
    assert!(total < Duration::from_secs(180), "the Slurm test took {total:?}, over its 3-minute bound");
    let _ = std::fs::remove_dir_all(&dir);
}
