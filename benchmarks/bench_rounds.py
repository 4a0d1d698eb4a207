"""Secure rounds vs. plain gloo all_reduce, side by side in one invocation.

For each N, the script runs N processes of each kind on this machine:

* ``gloo``: ``torch.distributed`` with the gloo backend, ``all_reduce`` of one
  flat float32 buffer holding the whole state dict (no privacy at all);
* ``secagg``: a scheduler and N ``Peer`` processes averaging the same state
  dict through lightning_secagg (CurveZMQ on, the defaults).

gloo runs twice, before and after secagg, and its rounds are pooled (a
20-round gloo run lasts half a second: its median at N = 6 moved between 14
and 26 ms from run to run).

Round time, for both, is measured the same way: from the moment the *last*
process enters the call to the moment the last one leaves it (wall clock,
``time.time()``, shared by all processes of one machine). Every process also
reports its CPU time per round (every thread of the process, libzmq's I/O
threads included; the table sums it over the peers, for gloo too: on a machine
with fewer cores than processes, CPU is what bounds the round; a second table
splits secagg's between the peers' own threads, libzmq's and the kernel) and,
secagg only, its bytes per role and its peak extra memory: the highest
resident set size it reaches in any round minus its resident set size at rest
after the warm-up rounds. A peer's roles change from round to round with the
tree, and the allocator keeps some of what a heavy round used, so that peak
is the process's, not a role's; the JSON also has each round's peak and its
growth within the round, by role.

Bandwidth-bound (``--rate``, root only): every peer and every gloo rank runs on
a host of its own (a network namespace of :mod:`benchmarks.netns`, the peer
bound to ``0.0.0.0`` and advertising its host's address), each host's link
capped at the rate both ways; the scheduler's host is uncapped. The table then
adds, per row, the median of the slowest process's whole call
(``aggregate()``, ``all_reduce``) and the lower bound of a secure round: the
busiest host's bytes one way (the planner's, :mod:`lightning_secagg.planner`,
and the measured ones) divided by the rate.

Torch threads (``--torch-threads``): ``1`` (the default) runs every process
with one intra-op thread, as the example does; ``default`` leaves torch's own
default (one thread per core), what a user gets without tuning, to show what
several peers on one host do to each other.

Usage::

    python benchmarks/bench_rounds.py --peers 6 12 30 --rounds 20 --warmup 3
    python benchmarks/bench_rounds.py --model resnet50 --peers 6
    python benchmarks/bench_rounds.py --peers 6 12 --rate 100mbit   # root: namespaces
    python benchmarks/bench_rounds.py --peers 6 --torch-threads default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: The port every peer listens on in its own namespace (each host has its own ports).
NET_PEER_PORT = 6000
#: The scheduler's port on its host, and rank 0's for gloo's rendezvous.
NET_SCHED_PORT, NET_GLOO_PORT = 5555, 29500


def set_threads(threads: str) -> None:
    """One intra-op thread, or torch's default (``"default"``)."""
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))


def build_state(model: str) -> dict:
    import torch

    torch.manual_seed(0)
    if model == "mnist":
        from examples.mnist.model import MNISTNet

        return MNISTNet().state_dict()
    if model == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None).state_dict()
    raise SystemExit(f"unknown model {model!r}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) and return the RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def peak_rss() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM")


# -- workers (run as subprocesses of this script) ------------------------------------------


def gloo_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    set_threads(args.torch_threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.gloo_host}:{args.port}",
        rank=args.rank,
        world_size=args.world,
    )
    state = build_state(args.model)
    flat = torch.cat([t.detach().reshape(-1).float() for t in state.values()])
    records = []
    for r in range(args.warmup + args.rounds):
        dist.barrier()
        start, cpu0 = time.time(), time.process_time()
        buf = flat.clone()
        dist.all_reduce(buf)
        buf /= args.world
        end, cpu = time.time(), time.process_time() - cpu0
        if r >= args.warmup:
            records.append({"start": start, "end": end, "cpu": cpu})
    Path(args.out).write_text(json.dumps({"records": records, "nbytes": flat.numel() * 4}))
    # Nobody leaves while another rank still talks to rank 0's store: without this
    # barrier a short run could end rank 0 first and abort another rank in its exit.
    dist.barrier()
    # Then leave without c10d's teardown: on a capped network it once aborted a rank
    # at exit ("terminate called without an active exception") after its records
    # were written; the records are all this process owes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


PROFILE = None
if os.environ.get("BENCH_PROFILE"):  # a directory: one cProfile dump per peer, rounds only
    import cProfile

    # Main-thread CPU time, not wall time: with more processes than cores, wall
    # time charges whichever call was running when the process was preempted.
    PROFILE = cProfile.Profile(time.thread_time)


def secagg_worker(args: argparse.Namespace) -> None:

    from lightning_secagg import Peer

    set_threads(args.torch_threads)
    state = build_state(args.model)
    records = []
    with Peer(
        args.bind,
        args.scheduler,
        advertise=args.advertise,
        peer_id=f"p{args.rank}",
        scheduler_key=None if args.insecure else args.key,
        insecure=args.insecure,
    ) as peer:
        rest = 0
        for r in range(args.warmup + args.rounds):
            if r >= args.warmup:
                # The peak mark restarts every round, so that the JSON has each round's
                # peak along with that round's roles (a peer's roles change per round).
                at_start = reset_peak_rss()
                if r == args.warmup:
                    rest = at_start  # resting footprint, pools warmed up
                    if PROFILE:
                        PROFILE.enable()
            start, cpu0, t0 = time.time(), time.process_time(), os.times()
            main0, faults0 = time.thread_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            peer.aggregate(state, timeout=600)
            end, cpu = time.time(), time.process_time() - cpu0
            main, t1 = time.thread_time() - main0, os.times()
            if r >= args.warmup:
                s = peer.last_stats
                records.append(
                    {
                        "start": start,
                        "end": end,
                        "cpu": cpu,
                        "main": main,  # this (the peer's) thread; the rest is libzmq's
                        "system": t1.system - t0.system,  # in the kernel (loopback copies)
                        # Pages touched for the first time (fresh buffers): each is a
                        # trap into the kernel and a page to zero.
                        "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0,
                        "sent": s.bytes_sent,
                        "received": s.bytes_received,
                        "roles": list(s.roles),
                        # Above the resting footprint; and above this round's start
                        # (memory the allocator kept from earlier rounds is in the
                        # first, not in the second).
                        "peak": peak_rss() - rest,
                        "growth": peak_rss() - at_start,
                    }
                )
    if PROFILE:
        PROFILE.disable()
        PROFILE.dump_stats(f"{os.environ['BENCH_PROFILE']}/p{args.rank}.prof")
    Path(args.out).write_text(json.dumps({"records": records}))


# -- the driver ----------------------------------------------------------------------------

#: The network of the current N under ``--rate`` (hosts "sched", "h0", "h1"...), else None.
NET = None


def bench_on_network(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    """:func:`bench` for one N, on a fresh network of N + 1 hosts under ``--rate``."""
    global NET
    if args.rate is None:
        return bench(n, args, tmp)
    from benchmarks.netns import Network

    # Peer i and gloo rank i share host h{i}: they never run at the same time.
    with Network(["sched", *(f"h{i}" for i in range(n))], args.rate, uncapped=["sched"]) as net:
        NET = net
        try:
            return bench(n, args, tmp)
        finally:
            NET = None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": args.gloo_ifname}
    if args.torch_threads == "default":
        env.pop("OMP_NUM_THREADS", None)  # torch's own default: one thread per core
    else:
        env["OMP_NUM_THREADS"] = args.torch_threads
    return env


def start(cmd: list[str], host: str | None, args: argparse.Namespace, **kw) -> subprocess.Popen:
    """Start a worker: on ``host`` of the network under ``--rate``, else here."""
    if NET is not None and host is not None:
        return NET.popen(host, cmd, env=worker_env(args), **kw)
    return subprocess.Popen(cmd, env=worker_env(args), **kw)


def run_procs(cmds: list[tuple[str | None, list[str]]], timeout: float, args) -> None:
    procs = [start(c, host, args) for host, c in cmds]
    try:
        for (host, cmd), p in zip(cmds, procs, strict=True):
            code = p.wait(timeout=timeout)
            if code != 0:
                raise SystemExit(
                    f"a benchmark worker failed: {cmd[2]} on {host or 'this host'}, "
                    f"exit code {code}"
                )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def slowest_calls(per_proc: list[dict]) -> list[float]:
    """Per round, the longest single call (``aggregate()`` or ``all_reduce``) of any process."""
    rounds = len(per_proc[0]["records"])
    return [
        max(p["records"][r]["end"] - p["records"][r]["start"] for p in per_proc)
        for r in range(rounds)
    ]


def round_times(per_proc: list[dict]) -> list[float]:
    rounds = len(per_proc[0]["records"])
    times = []
    for r in range(rounds):
        starts = [p["records"][r]["start"] for p in per_proc]
        ends = [p["records"][r]["end"] for p in per_proc]
        times.append(max(ends) - max(starts))
    return times


def run_gloo(n: int, args: argparse.Namespace, tmp: Path, tag: str) -> list[dict]:
    """One run of the gloo baseline: every process's records."""
    port = NET_GLOO_PORT if NET is not None else free_port()
    outs = [tmp / f"gloo-{n}-{tag}-{i}.json" for i in range(n)]
    run_procs(
        [
            (
                f"h{i}",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "_gloo",
                    *common_args(args),
                    "--rank",
                    str(i),
                    "--world",
                    str(n),
                    "--port",
                    str(port),
                    f"--gloo-host={NET.hosts['h0'].address if NET is not None else '127.0.0.1'}",
                    "--out",
                    str(outs[i]),
                ],
            )
            for i in range(n)
        ],
        timeout=1800,
        args=args,
    )
    return [json.loads(o.read_text()) for o in outs]


def common_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--rounds",
        str(args.rounds),
        "--warmup",
        str(args.warmup),
        "--torch-threads",
        args.torch_threads,
    ]


def scheduler_kwargs(n: int, args: argparse.Namespace) -> dict:
    return {
        "target_size": n,
        "round_timeout": 600,
        "insecure": args.insecure,
        **({"group_size": args.group_size} if args.group_size else {}),
        **({"num_actors": args.num_actors} if args.num_actors else {}),
    }


def scheduler_worker(args: argparse.Namespace) -> None:
    """Run a scheduler on this host until stdin closes; its address and key go to ``--out``."""
    from lightning_secagg import Scheduler

    kwargs = scheduler_kwargs(args.world, args)
    with Scheduler(port=args.port, host=args.gloo_host, **kwargs) as sched:
        Path(args.out).write_text(json.dumps({"address": sched.address, "key": sched.public_key}))
        sys.stdin.read()  # the driver closes our stdin to stop us


class remote_scheduler:
    """A scheduler process on the network's uncapped ``sched`` host."""

    def __init__(self, n: int, args: argparse.Namespace, tmp: Path) -> None:
        self.out = tmp / f"sched-{n}.json"
        me = [sys.executable, str(Path(__file__).resolve()), "_scheduler"]
        extra = [
            *(["--group-size", str(args.group_size)] if args.group_size else []),
            *(["--num-actors", str(args.num_actors)] if args.num_actors else []),
            *(["--insecure"] if args.insecure else []),
        ]
        self.proc = start(
            [
                *me,
                "--world",
                str(n),
                "--port",
                str(NET_SCHED_PORT),
                f"--gloo-host={NET.hosts['sched'].address}",
                "--out",
                str(self.out),
                *extra,
            ],
            "sched",
            args,
            stdin=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not self.out.exists() or not self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the scheduler did not start")
            time.sleep(0.05)
        info = json.loads(self.out.read_text())
        self.address, self.public_key = info["address"], info["key"]

    def __enter__(self) -> remote_scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = common_args(args)
    # The gloo baseline runs before and after the secure rounds, and its rounds are
    # pooled: a short gloo round is the more sensitive to whatever else the machine
    # does, and the two runs bracket the secure one in time.
    gloo_runs = [run_gloo(n, args, tmp, "before")]
    # secure aggregation
    from lightning_secagg import Scheduler

    outs = [tmp / f"secagg-{n}-{i}.json" for i in range(n)]

    def where(i: int) -> list[str]:
        if NET is None:
            return ["--bind", "tcp://127.0.0.1:0"]
        # A wildcard bind, as behind NAT or in a container: the others dial the
        # advertised address of this host.
        return [
            "--bind",
            f"tcp://0.0.0.0:{NET_PEER_PORT}",
            "--advertise",
            NET.hosts[f"h{i}"].endpoint(NET_PEER_PORT),
        ]

    sched_cm = (
        remote_scheduler(n, args, tmp)
        if NET is not None
        else Scheduler(port=0, **scheduler_kwargs(n, args))
    )
    with sched_cm as sched:
        run_procs(
            [
                (
                    f"h{i}",
                    [
                        *me,
                        "_secagg",
                        *common,
                        "--rank",
                        str(i),
                        "--scheduler",
                        sched.address,
                        f"--key={sched.public_key}",  # a Z85 key may start with "-"
                        *(["--insecure"] if args.insecure else []),
                        *where(i),
                        "--out",
                        str(outs[i]),
                    ],
                )
                for i in range(n)
            ],
            timeout=3600,
            args=args,
        )
    sec = [json.loads(o.read_text()) for o in outs]
    gloo_runs.append(run_gloo(n, args, tmp, "after"))
    g = [t for run in gloo_runs for t in round_times(run)]
    s = round_times(sec)
    model_bytes = gloo_runs[0][0]["nbytes"]

    def role_of(rec: dict) -> str:
        roles = rec["roles"]
        if "root-actor" in roles:
            return "root actor"
        return "actor" if any(x.startswith("actor@") for x in roles) else "leaf"

    by_role: dict[str, list[int]] = {}
    cpu_by_role: dict[str, list[float]] = {}
    peak_by_role: dict[str, list[int]] = {}
    growth_by_role: dict[str, list[int]] = {}
    for p in sec:
        for rec in p["records"]:
            by_role.setdefault(role_of(rec), []).append(rec["sent"] + rec["received"])
            cpu_by_role.setdefault(role_of(rec), []).append(rec["cpu"])
            peak_by_role.setdefault(role_of(rec), []).append(rec["peak"])
            growth_by_role.setdefault(role_of(rec), []).append(rec["growth"])

    def total_cpu(runs: list[list[dict]], key: str) -> float:
        """The median over rounds of what all processes spent in that round."""
        return statistics.median(
            sum(p["records"][r][key] for p in procs)
            for procs in runs
            for r in range(len(procs[0]["records"]))
        )

    # The busiest host, one way (each direction of a link is capped on its own):
    # per round, the most any peer sent or received; and the planner's figure.
    busiest = statistics.median(
        max(max(p["records"][r]["sent"], p["records"][r]["received"]) for p in sec)
        for r in range(len(sec[0]["records"]))
    )
    return {
        "n": n,
        "model": args.model,
        "model_bytes": model_bytes,
        "gloo": g,
        "secagg": s,
        "gloo_slowest_call": [t for run in gloo_runs for t in slowest_calls(run)],
        "secagg_slowest_call": slowest_calls(sec),
        "busiest_bytes": busiest,
        "planner_busiest_bytes": planner_busiest(n, args),
        "mean_bytes": statistics.mean(
            max(rec["sent"], rec["received"]) for p in sec for rec in p["records"]
        ),
        "bytes": {k: max(v) for k, v in by_role.items()},
        "cpu": {k: statistics.median(v) for k, v in cpu_by_role.items()},
        "cpu_total": total_cpu([sec], "cpu"),
        "cpu_main": total_cpu([sec], "main"),
        "cpu_system": total_cpu([sec], "system"),
        "faults": total_cpu([sec], "faults"),
        "gloo_cpu_total": total_cpu(gloo_runs, "cpu"),
        "peak_extra": max(max(v) for v in peak_by_role.values()),
        # Every round of every peer, by role, for the JSON.
        "peak_extra_by_role": peak_by_role,
        "growth_by_role": growth_by_role,
    }


#: Seeded tree draws the planner's busiest host is taken over (the scheduler draws
#: with a CSPRNG; which peers are actors at several levels changes the figure).
PLANNER_DRAWS = 11


def planner_busiest(n: int, args: argparse.Namespace) -> list[int]:
    """The planner's busiest host, the most one peer sends or receives, per seeded draw."""
    from lightning_secagg.encoding import Schema, magnitude_exponents
    from lightning_secagg.planner import plan

    state = build_state(args.model)
    schema, exponents = Schema.of(state), magnitude_exponents(state)
    busiest = []
    for seed in range(PLANNER_DRAWS):
        p = plan(
            n,
            args.group_size or 3,
            args.num_actors or 2,
            seed=seed,
            schema=schema,
            exponents=exponents,
        )
        busiest.append(p.busiest.one_way_bytes)
    return busiest


def fmt_net_row(res: dict, rate: str) -> str:
    from benchmarks.netns import rate_bits

    bits = rate_bits(rate)
    sc, gc = (
        statistics.median(res["secagg_slowest_call"]),
        statistics.median(res["gloo_slowest_call"]),
    )
    draws = res["planner_busiest_bytes"]
    planner = statistics.median(draws)
    bound = planner * 8 / bits
    mb = res["model_bytes"]
    gloo_bound = 2 * (res["n"] - 1) / res["n"] * mb * 8 / bits
    return (
        f"| {res['n']} | {res['model']} ({mb / 1e6:.1f} MB) | {sc * 1e3:.0f} | {gc * 1e3:.0f} "
        f"| {sc / gc:.2f}x | {planner / 1e6:.1f} ({min(draws) / 1e6:.1f}-{max(draws) / 1e6:.1f}) / "
        f"{res['busiest_bytes'] / 1e6:.1f} / {res['mean_bytes'] / 1e6:.1f} "
        f"| {bound * 1e3:.0f} | {sc / bound:.2f}x | {gloo_bound * 1e3:.0f} |"
    )


def fmt_row(res: dict) -> str:
    g, s = res["gloo"], res["secagg"]
    gm, sm = statistics.median(g), statistics.median(s)
    mb = res["model_bytes"]
    roles = ", ".join(f"{k} {v / mb:.2f}x" for k, v in sorted(res["bytes"].items()))
    return (
        f"| {res['n']} | {res['model']} ({mb / 1e6:.1f} MB) "
        f"| {sm * 1e3:.0f} / {min(s) * 1e3:.0f} / {max(s) * 1e3:.0f} "
        f"| {gm * 1e3:.0f} / {min(g) * 1e3:.0f} / {max(g) * 1e3:.0f} "
        f"| {sm / gm:.1f}x | {roles} | {res['peak_extra'] / mb:.2f}x "
        f"| {res['cpu_total'] * 1e3:.0f} / {res['gloo_cpu_total'] * 1e3:.0f} |"
    )


def fmt_cpu_row(res: dict) -> str:
    total, main, system = res["cpu_total"], res["cpu_main"], res["cpu_system"]
    return (
        f"| {res['n']} | {res['model']} | {total * 1e3:.0f} | {main * 1e3:.0f} "
        f"| {(total - main) * 1e3:.0f} | {system * 1e3:.0f} | {res['faults'] / 1e3:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", nargs="?", default="bench", choices=["bench", "_gloo", "_secagg", "_scheduler"]
    )
    parser.add_argument("--peers", type=int, nargs="+", default=[6, 12, 30])
    parser.add_argument("--model", default="mnist", choices=["mnist", "resnet50"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext links (no CURVE): only to measure what encryption costs",
    )
    parser.add_argument(
        "--group-size", type=int, default=None, help="the scheduler's group_size (default: its own)"
    )
    parser.add_argument(
        "--num-actors", type=int, default=None, help="the scheduler's num_actors (default: its own)"
    )
    parser.add_argument(
        "--rate",
        default=None,
        help="cap every host's link at this rate both ways (tc syntax, e.g. 100mbit): every "
        "peer and gloo rank on a network namespace of its own (needs root)",
    )
    parser.add_argument(
        "--torch-threads",
        default="1",
        help="intra-op threads per process: a number, or 'default' (torch's own: one per core)",
    )
    # worker-only arguments
    parser.add_argument("--bind", default="tcp://127.0.0.1:0")
    parser.add_argument("--advertise", default=None)
    parser.add_argument("--gloo-host", default="127.0.0.1")
    parser.add_argument("--gloo-ifname", default="eth0")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--key")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode == "_gloo":
        return gloo_worker(args)
    if args.mode == "_secagg":
        return secagg_worker(args)
    if args.mode == "_scheduler":
        return scheduler_worker(args)
    if args.torch_threads != "default" and not args.torch_threads.isdigit():
        raise SystemExit("--torch-threads: a number or 'default'")
    if args.rate is not None:
        from benchmarks.netns import rate_bits, unavailable_reason

        rate_bits(args.rate)
        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"--rate needs network namespaces: {reason}")
    # A SIGTERM ends the run through the same exits as Ctrl-C: the network's
    # namespaces and processes are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        for n in args.peers:
            results.append(bench_on_network(n, args, Path(d)))
            print(f"done N={n}", file=sys.stderr, flush=True)
    where = f"every host capped at {args.rate} both ways" if args.rate else "loopback"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
        f"{args.rounds} rounds after {args.warmup} warm-up, {where}, torch threads "
        f"{args.torch_threads}, "
        f"{'PLAINTEXT links (--insecure)' if args.insecure else 'CurveZMQ on'}"
    )
    if args.rate:
        print(
            "| N | model | secagg: slowest aggregate() ms, median | gloo: slowest all_reduce ms, "
            "median | ratio | busiest host MB one way: planner, median (range) over "
            f"{PLANNER_DRAWS} tree draws / measured, median over rounds / mean over peers "
            "| lower bound ms: planner's busiest / rate | secagg / bound | gloo's bound ms |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for res in results:
            print(fmt_net_row(res, args.rate))
        print()
    print(
        "| N | model | secagg ms median / min / max | gloo ms median / min / max "
        "| ratio | bytes per peer per round (sent + received) / model, by role "
        "| peak extra memory / model | CPU ms per round, all peers: secagg / gloo |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        print(fmt_row(res))
    print()
    print(
        "| N | model | secagg CPU ms per round, all peers | peers' own threads "
        "| libzmq's I/O threads | of all: in the kernel | page faults per round, thousands |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        print(fmt_cpu_row(res))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
