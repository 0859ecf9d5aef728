"""Fault injection against the batch job: actor kills, a driver kill, an S3 endpoint down; counts lost, duplicated
and wrong-byte images, all of which must be 0.

    python -m benchmarks.chaos --out chaos-out --doc docs/reliability.md

Runs on a local cluster started here (benchmarks.cluster, 2 CPUs) with the tiny random model, each job a
`python -m workflows.generate` process as a user starts it. First a calm run makes the reference images; then
each fault runs on an output of its own, and the same command is run again after it, as a user would, until it
exits 0 (at most --reruns times). Faults:
- actor kills: a storm of --kills SIGKILLs of generation actors, one every --kill-every seconds;
- driver kill: the job's process group SIGKILLed once a third of the images exist, then (its lease expired) rerun;
- S3 down: output on an S3 endpoint (moto's server on 127.0.0.1) that stops answering for --s3-down seconds
  once a quarter of the images exist, then comes back with its data.
An image is lost when the prompt file asks for it and the output holds no ok row or no file for it after the
reruns; duplicated when it has more than one ok row; wrong when its bytes differ from the calm run's or from
its row's sha256.
"""

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from pyarrow import fs

from benchmarks.cluster import actor_pids, local_cluster
from storage.uris import resolve

LEASE_TTL_S = 10
OVERRIDES = ["model.patch_sizes=[1,2,3,4,6,8,12,16]", "sparsevar.start_stage=6", "runtime.device=cpu",
             "ray.num_actors=2", "ray.batch_size=2", f"output.lease_ttl_s={LEASE_TTL_S}"]
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_REGION": "us-east-1",
                  "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class Outcome:
    fault: str
    expected: int
    lost: int
    duplicated: int
    wrong: int
    first_exit: int
    restarts: int  # pipeline restarts of the faulted run (ray.pipeline_restarts)
    reruns: int
    seconds: float


def job(prompts: Path, output: str, address: str, extra: list[str] = ()) -> subprocess.Popen:
    sets = [a for o in [*OVERRIDES, *extra] for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "workflows.generate", "--config", "configs/tiny-random.yaml",
                             "--prompts", str(prompts), "--output", output, *sets],
                            env={**os.environ, "RAY_ADDRESS": address}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def images_in(output: str, endpoint: str | None) -> dict[str, str]:
    """Image file name -> sha256 of its bytes."""
    filesystem, root = resolve(output, endpoint)
    found = {}
    for info in filesystem.get_file_info(fs.FileSelector(f"{root}/images", allow_not_found=True)):
        if info.base_name.endswith(".png"):
            with filesystem.open_input_stream(info.path) as stream:
                found[info.base_name] = hashlib.sha256(stream.read()).hexdigest()
    return found


def count_images(output: str, endpoint: str | None) -> int:
    filesystem, root = resolve(output, endpoint)
    infos = filesystem.get_file_info(fs.FileSelector(f"{root}/images", allow_not_found=True))
    return sum(1 for info in infos if info.base_name.endswith(".png"))


def ok_rows(output: str, endpoint: str | None) -> list[dict]:
    filesystem, root = resolve(output, endpoint)
    table = pq.read_table(f"{root}/metadata", filesystem=filesystem,
                          columns=["prompt_id", "seed", "status", "image_sha256"])
    return [row for row in table.to_pylist() if row["status"] == "ok"]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def judge(fault: str, reference: dict[str, str], output: str, endpoint: str | None, faulted: subprocess.Popen,
          log: str, reruns: int, seconds: float) -> Outcome:
    rows, files = ok_rows(output, endpoint), images_in(output, endpoint)
    names = [f"{row['prompt_id']}-s{row['seed']}.png" for row in rows]
    recorded = dict(zip(names, (row["image_sha256"] for row in rows), strict=True))
    lost = sum(1 for name in reference if name not in recorded or name not in files)
    wrong = sum(1 for name, sha in reference.items() if name in files and (files[name] != sha or
                                                                           recorded.get(name, sha) != sha))
    return Outcome(fault, len(reference), lost, len(names) - len(set(names)), wrong, faulted.returncode,
                   log.count("the pipeline starts again"), reruns, seconds)


def finish(prompts: Path, output: str, address: str, extra: list[str], reruns: int) -> int:
    """Run the same command again until it exits 0 (at most `reruns` times); how many runs it took."""
    for count in range(1, reruns + 1):
        proc = job(prompts, output, address, extra)
        log, _ = proc.communicate()
        if proc.returncode == 0:
            return count
        if "is being written by another job" in log:  # a killed driver's lease: wait out its time to live
            time.sleep(LEASE_TTL_S)
    return reruns


def actor_kills(prompts: Path, out: Path, address: str, args: argparse.Namespace, reference: dict[str, str]
                ) -> Outcome:
    started, output = time.monotonic(), str(out / "actor-kills")
    proc = job(prompts, output, address)
    wait_for(lambda: count_images(output, None) >= 2, proc)
    for _ in range(args.kills):
        if proc.poll() is not None:
            break
        for pid in actor_pids()[:1]:
            os.kill(pid, signal.SIGKILL)
        time.sleep(args.kill_every)
    log, _ = proc.communicate()
    reruns = 0 if proc.returncode == 0 else finish(prompts, output, address, [], args.reruns)
    return judge("actor kills", reference, output, None, proc, log, reruns, time.monotonic() - started)


def driver_kill(prompts: Path, out: Path, address: str, args: argparse.Namespace, reference: dict[str, str]
                ) -> Outcome:
    started, output = time.monotonic(), str(out / "driver-kill")
    proc = job(prompts, output, address)
    wait_for(lambda: count_images(output, None) >= args.prompts // 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    log, _ = proc.communicate()
    time.sleep(LEASE_TTL_S)  # the dead driver's lease on the output expires
    reruns = finish(prompts, output, address, [], args.reruns)
    return judge("driver kill", reference, output, None, proc, log, reruns, time.monotonic() - started)


def s3_down(prompts: Path, out: Path, address: str, args: argparse.Namespace, reference: dict[str, str]
            ) -> Outcome:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="chaos")
    started, output, extra = time.monotonic(), "s3://chaos/out", [f"storage.endpoint_url={endpoint}"]
    try:
        proc = job(prompts, output, address, extra)
        wait_for(lambda: count_images(output, endpoint) >= args.prompts // 4, proc)
        server.stop()  # the endpoint stops answering; moto's buckets live on in this process
        time.sleep(args.s3_down)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        log, _ = proc.communicate()
        reruns = 0 if proc.returncode == 0 else finish(prompts, output, address, extra, args.reruns)
        return judge("S3 down", reference, output, endpoint, proc, log, reruns, time.monotonic() - started)
    finally:
        server.stop()


FAULTS = {"actor kills": actor_kills, "driver kill": driver_kill, "S3 down": s3_down}


def markdown(outcomes: list[Outcome], args: argparse.Namespace, command: str) -> str:
    lines = ["# Reliability: the job under faults", "",
             f"Made by `{command}` (benchmarks/chaos.py says how). {args.prompts} prompts, tiny random model, 2 "
             f"actors of batch 2 on a 2-CPU local cluster; {args.kills} actor kills {args.kill_every:g} s apart, "
             "S3 down for "
             f"{args.s3_down:g} s. Lost, duplicated and wrong images must all be 0.", "",
             "- actor kills: generation actors SIGKILLed one after another, faster than Ray restarts them (Ray "
             "Data then stops; the job starts its pipeline again, `ray.pipeline_restarts`);",
             "- driver kill: the job's process group SIGKILLed once a third of the images exist; the same command "
             "is run again once the dead job's lease on the output has expired;",
             "- S3 down: the output's S3 endpoint (moto's server) stops answering once a quarter of the images exist, "
             "then comes back with its data; images whose writes failed are error rows, generated by the rerun.",
             "",
             "An image is lost when the output holds no ok row or no file for it after the reruns, duplicated when "
             "it has more than one ok row, wrong when its bytes differ from a calm run's or from its row's sha256.",
             "",
             "| fault | images | lost | duplicated | wrong bytes | exit of the faulted run | its pipeline restarts "
             "| reruns to exit 0 | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.fault} | {o.expected} | {o.lost} | {o.duplicated} | {o.wrong} | {o.first_exit} | "
                     f"{o.restarts} | {o.reruns} | {o.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts in the generated prompt file")
    parser.add_argument("--out", type=Path, default=Path("chaos-out"), help="folder for the outputs and prompts")
    parser.add_argument("--kills", type=int, default=8, help="actor kills in the storm")
    parser.add_argument("--kill-every", type=float, default=2.0, help="seconds between actor kills")
    parser.add_argument("--s3-down", type=float, default=15.0, help="seconds the S3 endpoint does not answer")
    parser.add_argument("--reruns", type=int, default=3, help="reruns allowed after a fault to reach exit 0")
    parser.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--doc", type=Path, help="write the table here too (markdown)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"c{i}", "prompt": f"shape {i}", "seed": i}) + "\n"
                               for i in range(args.prompts)))
    os.environ.update(S3_CREDENTIALS)  # before the cluster starts, so its workers inherit them (moto only)
    # a throwaway cluster on 127.0.0.1: a ~/.ray/auth_token left by an earlier ray.init() would make `ray start`
    # demand tokens from every job
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cluster started here is stopped
    os.environ.pop("AWS_ENDPOINT_URL", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    outcomes = []
    with local_cluster(num_cpus=2) as cluster:
        calm = job(prompts, str(args.out / "calm"), cluster.address)
        log, _ = calm.communicate()
        if calm.returncode != 0:
            print(log, file=sys.stderr)
            return 1
        reference = images_in(str(args.out / "calm"), None)
        for name in args.faults:
            outcomes.append(FAULTS[name](prompts, args.out, cluster.address, args, reference))
            print(outcomes[-1], flush=True)
    command = "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(outcomes, args, command)
    print(table)
    if args.doc:
        args.doc.write_text(table)
    return 0 if all(o.lost == o.duplicated == o.wrong == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
