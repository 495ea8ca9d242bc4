"""What each key of the policy file means: the one table that the corecap.toml(5) manual page
is generated from (scripts/build_docs.py), and that the schema (corecapd/policy.py) and the
comments of `etc/corecap.toml` are checked against (tests/test_docs.py): every key the schema
accepts is here, every key here is accepted, each documented default is the schema's, and
each key is commented in the shipped policy.

Data only: no I/O, nothing imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    """One key of the policy file.

    `path` is the key path as policy errors name it, with `rules[]` for any rule and `NAME`
    for any user (`daemon.mode`, `rules[].match.exe`, `users.NAME.max_cpus`); `kind` what
    the value is; `default` the value when the key is absent, as TOML (for `[daemon]` and
    `[defaults]`, checked against the schema), or a phrase, or None when the key has no
    default (required, or off); `text` what it does, plain sentences.
    """

    path: str
    kind: str
    default: str | None
    text: str


KEYS: tuple[Key, ...] = (
    Key(
        "rules",
        "array of tables",
        None,
        "The rules, written as [[rules]] tables; the first rule that matches a process makes"
        " it a job. Required: a policy without rules is refused, so that an empty or"
        " half-written file never lets go of every job; to run without rules on purpose,"
        " write rules = [] at the top of the file, before any [table].",
    ),
    Key(
        "daemon.mode",
        "string",
        '"enforce"',
        '"enforce": confine every thread of each job to its granted CPUs. "monitor": a dry'
        " run: detect jobs, count their threads, report what would be done and any"
        " violations, change nothing.",
    ),
    Key(
        "daemon.backend",
        "string",
        '"auto"',
        "The fence after the affinity fast path (every thread's CPU mask is always set"
        ' first). "systemd": a transient scope per job with AllowedCPUs=, over the system'
        ' D-Bus (systemd >= 244, cgroup v2). "cgroup2": a cgroup v2 cpuset per job in a'
        " subtree corecapd owns (under systemd, systemd >= 254 with the drop-in"
        ' systemd/cgroup2.conf). "cgroup1": a cgroup v1 cpuset per job. "affinity": masks'
        " only; a job that widens its own mask is set back at the next scan and an escape is"
        ' logged. "auto": the first of these that works here, in that order; the reason is'
        " shown at start and by corecapctl status. A backend named here that cannot work"
        " stops the start. Takes effect at restart.",
    ),
    Key(
        "daemon.scan_interval",
        "seconds",
        "1.0",
        "Seconds between scans, 0.05 to 3600. A scan samples every job's processes"
        " (thread counts, CPU time, masks set back) and reads the libraries of those that"
        " are due. With exec_events on it reads nothing else: exec, fork and exit events"
        " say what is new and what has gone, so its cost follows the jobs, not the host's"
        " processes. Without them every scan reads all of /proc.",
    ),
    Key(
        "daemon.reconcile_interval",
        "seconds",
        "120.0",
        "Seconds between complete scans of /proc while exec_events are on, 0.05 to 86400"
        " (at or below scan_interval: every scan is complete):"
        " they find what no event told (a change of user without an exec; a process whose"
        " ancestor became a job only once its libraries loaded, found sooner: such a job"
        " asks for one), and let go of what is kept of processes that have gone. Events"
        " lost make one at once. Each costs 20-36 us of CPU per process on the host: at"
        " 10,000 processes, one every 120 s is 0.2-0.3% of a core.",
    ),
    Key(
        "daemon.reserved_cpus",
        "CPU list",
        '""',
        'CPUs never handed to jobs, in the kernel\'s list format ("0", "0,2-3"); "" = none.'
        " It must leave an online CPU.",
    ),
    Key(
        "daemon.socket",
        "path",
        '"/run/corecap/corecap.sock"',
        "The Unix socket of the API that corecapctl and the job library use; root's own"
        " socket lies beside it (corecap.root.sock). Takes effect at restart.",
    ),
    Key(
        "daemon.exec_events",
        "boolean",
        "true",
        "Find new processes the moment they exec (the kernel's netlink process connector),"
        " so that a job is confined before Python runs its first statement, and a job's"
        " workers once they fork (taken in with the next exit, job exec, scan, request or"
        " scrape); with them, scans read only the jobs' processes"
        " (reconcile_interval). false: every scan reads all of /proc. Takes effect at"
        " restart.",
    ),
    Key(
        "daemon.realtime_priority",
        "integer",
        "0",
        "SCHED_FIFO priority (1 to 99) for the exec path; 0: normal scheduling. Under"
        " systemd leave it 0: the shipped unit sets CPUSchedulingPolicy=fifo. Takes effect"
        " at restart.",
    ),
    Key(
        "daemon.cgroup",
        "name",
        '"corecap"',
        "The cgroup directory (and, with the systemd backend, the slice name) corecapd"
        " creates and owns for its fences. Takes effect at restart.",
    ),
    Key(
        "daemon.state_dir",
        "path",
        '"/run/corecap"',
        "Where the declarations of registered jobs are kept across restarts"
        " (state.json); it must belong to root and not be writable by group or others."
        " Takes effect at restart.",
    ),
    Key(
        "daemon.metrics",
        "address",
        '""',
        'Serve Prometheus metrics at http://HOST:PORT/metrics: "HOST:PORT" with HOST an IP'
        ' address ("127.0.0.1:9787", "[::1]:9787", "0.0.0.0:9787" for every address); ""'
        " = no metrics. Under systemd the shipped unit may not open Internet sockets: the"
        " socket unit corecapd-metrics.socket listens on the same address and hands the"
        " socket over, with its IPAddressAllow= naming who may scrape (README, Fleet)."
        " Takes effect at restart.",
    ),
    Key(
        "defaults.cpus",
        "integer",
        "4",
        "Cores for a job whose rule does not say cpus, 1 to 8192.",
    ),
    Key(
        "defaults.thread_slack",
        "integer",
        "8",
        "Threads tolerated beyond a budget derived from the cores (not added to max_threads).",
    ),
    Key(
        "defaults.grace",
        "seconds",
        "10.0",
        "Seconds after a process starts before its thread count can be a violation"
        " (imports, pool creation and warm-up are allowed their spikes).",
    ),
    Key(
        "defaults.violation_after",
        "integer",
        "3",
        "Consecutive over-budget scans before a violation is reported, and consecutive"
        " scans within budget before it is reported resolved, 1 to 1000.",
    ),
    Key(
        "rules[].name",
        "string",
        None,
        "The rule's name, unique in the policy; required. corecapctl status shows it.",
    ),
    Key(
        "rules[].match",
        "table",
        None,
        "What the rule matches: the criteria below, all given ones must hold, at least one"
        " given; required.",
    ),
    Key(
        "rules[].match.exe",
        "array of globs",
        "Python interpreters",
        "Globs on the file name of /proc/PID/exe (python*, pypy3, ...; the script's name"
        " does not matter).",
    ),
    Key(
        "rules[].match.cmdline",
        "regular expression",
        None,
        "A regular expression searched in the process's arguments joined by spaces"
        " (the first 64 KiB of them), for at most 5 ms: a search that takes longer (a"
        " pattern that backtracks badly on arguments a job chose) counts as no match.",
    ),
    Key(
        "rules[].match.users",
        "array of strings",
        None,
        'User names, or "@group". Processes of root and system users (uid < 1000) are'
        " only matched by a rule that names their user.",
    ),
    Key(
        "rules[].match.loads",
        "array of strings",
        None,
        'Parts of shared library file names in /proc/PID/maps, e.g. "tensorflow".'
        " Libraries load late (TensorFlow about 2 s after start), so such a rule matches"
        " only once they have; use exe or cmdline to confine from the start.",
    ),
    Key(
        "rules[].cpus",
        "integer",
        "defaults.cpus",
        "Cores to grant the job, 1 to 8192.",
    ),
    Key(
        "rules[].max_threads",
        "integer",
        None,
        "The job's thread budget. Without it the budget is derived from the cores:"
        " 6 + 7 x cpus for TensorFlow, 4 + 2 x cpus for other Python, 1 for any other"
        " process of the job, plus thread_slack.",
    ),
    Key(
        "rules[].sub_job",
        "boolean",
        "false",
        "true: a process this rule matches that runs below another job's process (a trial"
        " of a hyperparameter search, started by the search's driver) becomes a sub-job of"
        " that job: its cpus are carved out of the enclosing job's grant, apart from its"
        " other sub-jobs' while there are enough (else shared within that grant, and its"
        " notes say so), with a budget and violations of its own. A sub-job's own"
        " processes never make sub-jobs of its own rule (its forked workers carry its"
        " command line). false: such a process stays a plain member of the enclosing job."
        " Outside every job the rule makes a job like any other. The enclosing job's own"
        " processes keep its whole grant; it ends when its last process and its last"
        " sub-job have ended. A process of a job that registers (corecap run,"
        " corecapd.register) becomes a sub-job too.",
    ),
    Key(
        "users.NAME.max_cpus",
        "integer",
        None,
        "Distinct cores all of user NAME's jobs may hold together, 1 to 8192.",
    ),
)
