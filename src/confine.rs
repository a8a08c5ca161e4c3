//! The confinement every FFmpeg and ffprobe run gets, applied by this same
//! binary (`internvl-grpc confine … -- PROGRAM ARGS`) in a process of its
//! own between the server's spawn and the program's `exec`, so that nothing
//! runs between fork and exec but what `std` itself does, and the rules
//! cannot be forgotten by a caller: the policy is here, not in the command
//! line that asks for it.
//!
//! Everything used is open to an unprivileged process without capabilities
//! under a container runtime's default seccomp profile (Docker's,
//! containerd's, CRI-O's and `containers-common`'s all allow `prctl`,
//! `setrlimit`, `seccomp` and the three Landlock calls), which bubblewrap's
//! user namespaces are not. In order:
//! 1. a new session (no controlling terminal to push input into);
//! 2. resource limits: address space (`media_video_memory_mb`), no core
//!    file, no file written, few descriptors;
//! 3. no descriptor but stdin, stdout and stderr: every other one is closed
//!    (`close_range`), and the helper refuses to run the program if one
//!    stays;
//! 4. `no_new_privs`;
//! 5. Landlock: read and execute beneath `/usr` (and the program's own
//!    folder), read `/etc/ld.so.cache`, nothing else, nothing written; TCP
//!    bind and connect denied; signals and abstract sockets scoped to the
//!    sandbox (where the kernel has those rights);
//! 6. a seccomp filter of its own ([`filter`]): no socket at all, no
//!    `ptrace` or reading another process's memory, no new namespaces, no
//!    mounts, no keyrings, BPF, perf, io_uring or user faults, and signals
//!    only to itself.
//!
//! `limits_only` (`media_video_sandbox = off`) applies steps 1 to 3 and
//! nothing else.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use rustix::process::{Resource, Rlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// The subcommand's name, for the parent that builds the command line.
pub const SUBCOMMAND: &str = "confine";

/// Descriptors the confined program may open at once: FFmpeg needs a
/// handful (its input, output, error, the loader's libraries while they load).
const MAX_FILES: u64 = 64;

/// Folders and files the program may read (and, folders, execute from)
/// besides its own folder: the system's programs and libraries, and the
/// loader's cache. Debian's `/etc/alternatives` links need no rule: Landlock
/// checks the file a link resolves to, beneath `/usr`.
const READABLE: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"];

/// What the parent asks of one confined run.
#[derive(Debug, Clone)]
pub struct Request {
    /// Address space the program may map, in bytes.
    pub memory_bytes: u64,
    /// Resource limits only (`media_video_sandbox = off`).
    pub limits_only: bool,
    /// The program, by path.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl Request {
    /// The arguments after this binary's path that ask for this run.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            SUBCOMMAND.into(),
            "--memory-bytes".into(),
            self.memory_bytes.to_string().into(),
        ];
        if self.limits_only {
            args.push("--limits-only".into());
        }
        args.push("--".into());
        args.push(self.program.clone().into_os_string());
        args.extend(self.args.iter().cloned());
        args
    }
}

/// Why the program could not be started confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// `setsid` failed, and a controlling terminal is still there.
    #[error("cannot leave the controlling terminal (setsid): {0}")]
    Session(std::io::Error),
    /// A resource limit could not be set.
    #[error("cannot set the {resource} limit: {source}")]
    Limit {
        /// Which limit.
        resource: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The server let a descriptor through that the program would inherit.
    #[error("descriptor {fd} ({target}) would be inherited; refusing to run")]
    InheritedDescriptor {
        /// Its number.
        fd: i32,
        /// What it is open on.
        target: String,
    },
    /// `/proc/self/fd` could not be listed.
    #[error("cannot list this process's descriptors: {0}")]
    Descriptors(std::io::Error),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    /// A Landlock call failed.
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    /// The kernel enforces no Landlock rule.
    #[error(
        "Landlock is not enforced by this kernel (5.13 or newer, with landlock in its lsm= list)"
    )]
    LandlockUnavailable,
    /// The filter could not be installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    /// The filter could not be built.
    #[error("seccomp filter: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
    /// `exec` of the program failed.
    #[error("cannot run {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Confines this process and becomes `request.program`; returns only when
/// that could not be done.
pub fn exec(request: &Request) -> ConfineError {
    match confine(request) {
        Err(e) => e,
        Ok(()) => {
            let error = std::process::Command::new(&request.program)
                .args(&request.args)
                .exec();
            ConfineError::Exec {
                program: request.program.display().to_string(),
                source: error,
            }
        }
    }
}

fn confine(request: &Request) -> Result<(), ConfineError> {
    // A process group leader (as `runc exec` starts one) may not start a
    // session; what matters is that no terminal is reachable.
    if let Err(e) = rustix::process::setsid() {
        if std::fs::File::open("/dev/tty").is_ok() {
            return Err(ConfineError::Session(e.into()));
        }
    }
    limit(Resource::As, "address space", request.memory_bytes)?;
    limit(Resource::Core, "core file", 0)?;
    limit(Resource::Fsize, "file size", 0)?;
    limit(Resource::Nofile, "open files", MAX_FILES)?;
    no_inherited_descriptors()?;
    if request.limits_only {
        return Ok(());
    }
    rustix::thread::set_no_new_privs(true).map_err(|e| ConfineError::NoNewPrivs(e.into()))?;
    restrict_files(&request.program)?;
    // Two filters: one answer per filter, and clone3 needs its own (ENOSYS,
    // so the C library falls back to clone, whose flags a filter can read;
    // clone3's are behind a pointer).
    seccompiler::apply_filter(&filter()?)?;
    seccompiler::apply_filter(&clone3_filter()?)?;
    Ok(())
}

fn limit(resource: Resource, name: &'static str, value: u64) -> Result<(), ConfineError> {
    let value = Some(value);
    rustix::process::setrlimit(
        resource,
        Rlimit {
            current: value,
            maximum: value,
        },
    )
    .map_err(|e| ConfineError::Limit {
        resource: name,
        source: e.into(),
    })
}

/// Closes every descriptor but 0, 1 and 2: Landlock governs opening files,
/// not reading one already open, so a descriptor inherited without
/// close-on-exec (the server's parent's, or one a C library opened without
/// `O_CLOEXEC`) would carry a model or a secret past every rule here. Then
/// checks that none is left, and refuses to go on if one is.
fn no_inherited_descriptors() -> Result<(), ConfineError> {
    close_from_3()?;
    // The listing holds a descriptor of its own while it is read: collect,
    // let it close, then keep those still open.
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(ConfineError::Descriptors)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in listed {
        if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            return Err(ConfineError::InheritedDescriptor {
                fd,
                target: target.display().to_string(),
            });
        }
    }
    Ok(())
}

/// `close_range(3, ~0, 0)`: no safe interface exists for closing
/// descriptors this process did not open itself (it is I/O-unsafe by
/// nature), so this is the one unsafe call outside `internvl-llama`.
#[allow(unsafe_code)]
fn close_from_3() -> Result<(), ConfineError> {
    // SAFETY: close_range takes integers only and touches no memory of this
    // process. Closing descriptors that other code owns would be unsound
    // where that code still uses them; here nothing does: this process is
    // the single-threaded `confine` subcommand, which has opened nothing
    // above 2 (the command line is parsed, no file is open) and execs the
    // program next.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed == 0 {
        Ok(())
    } else {
        Err(ConfineError::Descriptors(std::io::Error::last_os_error()))
    }
}

/// The folders [`READABLE`] and the program's own, readable and executable;
/// nothing else readable, nothing writable.
fn restrict_files(program: &Path) -> Result<(), ConfineError> {
    // The newest rights this crate knows; an older kernel enforces what it
    // has (reported as partial), and one without Landlock is refused below.
    let abi = ABI::V6;
    let mut readable: Vec<PathBuf> = READABLE.iter().map(PathBuf::from).collect();
    if let Some(folder) = program.parent() {
        readable.push(folder.to_path_buf());
    }
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rules(landlock::path_beneath_rules(
            &readable,
            AccessFs::from_read(abi),
        ))?
        .restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(ConfineError::LandlockUnavailable);
    }
    Ok(())
}

/// The kernel's `CLONE_NEW*` flags: a clone that asks for any is refused.
const NAMESPACE_FLAGS: &[u64] = &[
    0x0000_0080, // CLONE_NEWTIME
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// System calls refused outright (EPERM): what decoding a file never needs
/// and an exploited decoder would want first.
const REFUSED: &[i64] = &[
    // The network, and any socket: the program is given its pipes.
    libc::SYS_socket,
    // Other processes: debugging, memory, descriptors, signals by handle.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_tkill,
    // Namespaces and mounts.
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Files by handle, which bypass path checks.
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    // The kernel's larger surfaces.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_quotactl,
];

fn target_arch() -> Result<seccompiler::TargetArch, ConfineError> {
    Ok(std::env::consts::ARCH.try_into()?)
}

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, ConfineError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        op,
        value,
    )?)
}

/// The seccomp filter: every call allowed but [`REFUSED`], a `clone` with a
/// namespace flag, and `kill`, `tgkill` or `rt_(tg)sigqueueinfo` aimed at
/// another process (this process's id is fixed now, and `exec` keeps it).
pub fn filter() -> Result<BpfProgram, ConfineError> {
    let me = u64::from(rustix::process::getpid().as_raw_nonzero().get() as u32);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|&call| (call, Vec::new())).collect();
    let mut clone = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        clone.push(SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])?);
    }
    rules.insert(libc::SYS_clone, clone);
    for call in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        // Not 0 or negative either: a process group, or every process.
        rules.insert(
            call,
            vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, me)?])?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// `clone3` answered "not implemented", so the C library uses `clone`.
fn clone3_filter() -> Result<BpfProgram, ConfineError> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_as_it_was_written() {
        let request = Request {
            memory_bytes: 1 << 30,
            limits_only: false,
            program: "/usr/bin/ffmpeg".into(),
            args: vec!["-v".into(), "error".into()],
        };
        let args: Vec<String> = request
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "confine",
                "--memory-bytes",
                "1073741824",
                "--",
                "/usr/bin/ffmpeg",
                "-v",
                "error"
            ]
        );
    }

    #[test]
    fn the_filters_compile_for_this_machine() {
        assert!(!filter().unwrap().is_empty());
        assert!(!clone3_filter().unwrap().is_empty());
    }
}
