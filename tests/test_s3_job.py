"""The job against a real S3 endpoint on loopback: prompts read from it, images (files or WebDataset shards) and
Parquet written to it, a re-run that resumes from it, and buckets the job may not use."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid

import boto3
import pyarrow.parquet as pq
import pytest
from moto.core import enable_iam_authentication

from storage.uris import resolve
from workflows.generate import EXIT_BAD_INPUT, main


@pytest.fixture
def bucket(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prompts = "".join(json.dumps({"id": f"p{i}", "prompt": f"a shape number {i}", "seed": i}) + "\n" for i in range(5))
    s3.put_object(Bucket="bucket", Key="in/prompts.jsonl", Body=prompts.encode())
    return s3


def objects(s3, prefix: str) -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket="bucket", Key=o["Key"])["Body"].read() for o in listing}


def test_prompts_images_and_metadata_on_s3_and_resume(ray_cluster, fast_overrides, s3_endpoint, bucket, capsys):
    argv = ["--config", "configs/tiny-random.yaml", "--prompts", "s3://bucket/in/prompts.jsonl", "--output",
            "s3://bucket/out/run1", *[a for o in [*fast_overrides, f"storage.endpoint_url={s3_endpoint}",
                                                  "ray.batch_size=1", "output.merge_every=2"]
                                      for a in ("--set", o)]]
    assert main(argv) == 0
    # 5 batches merged 2 at a time as they came back (pyarrow may leave a folder marker, "metadata/", on S3)
    metadata = sorted(key for key in objects(bucket, "out/run1/metadata/") if not key.endswith("/"))
    assert len(metadata) == 3 and sum("/compacted-" in key for key in metadata) == 2, metadata
    images = objects(bucket, "out/run1/images/")
    index = [json.loads(line) for line in images.pop("out/run1/images/metadata.jsonl").decode().splitlines()]
    assert sorted(images) == [f"out/run1/images/p{i}-s{i}.png" for i in range(5)]
    assert sorted(r["file_name"] for r in index) == [f"p{i}-s{i}.png" for i in range(5)]  # Hugging Face imagefolder
    head = bucket.head_object(Bucket="bucket", Key="out/run1/images/p0-s0.png")
    assert head["ContentType"] == "image/png"
    filesystem, path = resolve("s3://bucket/out/run1/metadata", s3_endpoint)
    table = pq.read_table(path, filesystem=filesystem)
    assert table.num_rows == 5 and set(table["status"].to_pylist()) == {"ok"}
    for row in table.to_pylist():
        key = row["image_uri"].removeprefix("s3://bucket/")
        assert hashlib.sha256(images[key]).hexdigest() == row["image_sha256"]
    record = json.loads(objects(bucket, "out/run1/run.json")["out/run1/run.json"])
    assert record["images"] == 5
    assert "testing" not in json.dumps(record)  # no credentials in the run record

    # a second run with the same output has nothing left to do and writes no row twice
    capsys.readouterr()
    assert main(argv) == 0
    assert "images written: 0" in capsys.readouterr().out
    runs = {key: json.loads(body) for key, body in objects(bucket, "out/run1/runs/").items()}
    assert sorted(run["images"] for run in runs.values()) == [0, 5]  # both invocations recorded, on S3
    summary = json.loads(objects(bucket, "out/run1/run.json")["out/run1/run.json"])
    assert summary["images"] == 5 and len(summary["runs"]) == 2  # not overwritten with the no-op's zeros
    assert pq.read_table(path, filesystem=filesystem).num_rows == 5
    assert {k: v for k, v in objects(bucket, "out/run1/images/").items() if k.endswith(".png")} == images

    # an image damaged in the bucket (same size, other bytes) is found by --verify, which reads every image
    damaged = bytearray(images["out/run1/images/p3-s3.png"])
    damaged[-20] ^= 0xFF
    bucket.put_object(Bucket="bucket", Key="out/run1/images/p3-s3.png", Body=bytes(damaged))
    assert main([*argv, "--verify"]) == 0
    assert "images written: 1" in capsys.readouterr().out
    assert {k: v for k, v in objects(bucket, "out/run1/images/").items() if k.endswith(".png")} == images
    assert pq.read_table(path, filesystem=filesystem).num_rows == 5


def test_webdataset_job_on_s3_writes_shards_and_remakes_a_lost_one(ray_cluster, fast_overrides, s3_endpoint, bucket,
                                                                   capsys):
    overrides = [*fast_overrides, f"storage.endpoint_url={s3_endpoint}", "output.format=webdataset",
                 "output.shard_size=2"]
    argv = ["--config", "configs/tiny-random.yaml", "--prompts", "s3://bucket/in/prompts.jsonl", "--output",
            "s3://bucket/out/wds", *[a for o in overrides for a in ("--set", o)]]
    assert main(argv) == 0
    shards = objects(bucket, "out/wds/shards/")
    assert sorted(shards) == [f"out/wds/shards/images-00000{i}.tar" for i in range(3)]  # 2 + 2 + 1 samples
    head = bucket.head_object(Bucket="bucket", Key="out/wds/shards/images-000000.tar")
    assert head["ContentType"] == "application/x-tar"
    assert not objects(bucket, "out/wds/images/")
    filesystem, path = resolve("s3://bucket/out/wds/metadata", s3_endpoint)
    table = pq.read_table(path, filesystem=filesystem)
    assert table.num_rows == 5 and set(table["status"].to_pylist()) == {"ok"}
    for row in table.to_pylist():
        assert row["image_uri"] == f"{row['shard']}#{row['sample_key']}.png"
        with tarfile.open(fileobj=io.BytesIO(shards[row["shard"].removeprefix("s3://bucket/")])) as tar:
            image = tar.extractfile(f"{row['sample_key']}.png").read()
            assert tar.extractfile(f"{row['sample_key']}.txt").read().decode() == row["prompt"]
        assert hashlib.sha256(image).hexdigest() == row["image_sha256"]
    page = objects(bucket, "out/wds/report/")["out/wds/report/index.html"].decode()
    assert page.count('<figure class="item"') == 5, "the report read each image out of its shard on S3"

    # a lost shard is made again, byte for byte, and its rows are recorded once
    bucket.delete_object(Bucket="bucket", Key="out/wds/shards/images-000001.tar")
    capsys.readouterr()
    assert main(argv) == 0
    assert "images written: 2" in capsys.readouterr().out
    assert objects(bucket, "out/wds/shards/") == shards
    again = pq.read_table(path, filesystem=filesystem)
    assert sorted(again["image_uri"].to_pylist()) == sorted(table["image_uri"].to_pylist())


@pytest.fixture
def locked_bucket(s3_endpoint, monkeypatch):
    """A bucket the job's credentials may not use: the endpoint enforces IAM, and the credentials are those of a
    user allowed only `bucket`."""
    name, user = f"locked-{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="prompts.jsonl", Body=b'{"prompt": "a cat"}\n')
    iam.create_user(UserName=user)
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::bucket", "arn:aws:s3:::bucket/*"]}
    iam.put_user_policy(UserName=user, PolicyName="bucket-only",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with enable_iam_authentication():
        yield name


def test_buckets_that_are_missing_or_forbidden_are_named_before_any_work(ray_cluster, fast_overrides, s3_endpoint,
                                                                         locked_bucket, tmp_path, capsys):
    sets = [a for o in [*fast_overrides, f"storage.endpoint_url={s3_endpoint}"] for a in ("--set", o)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n')
    cases = [
        (f"s3://{locked_bucket}/prompts.jsonl", "s3://bucket/out/x",
         f"cannot open prompts s3://{locked_bucket}/prompts.jsonl: "),
        # S3 answers 403, not 404, for a bucket the credentials may not list, missing or not
        ("s3://no-such-bucket/prompts.jsonl", "s3://bucket/out/x", "prompts s3://no-such-bucket/prompts.jsonl: "),
        (str(prompts), f"s3://{locked_bucket}/out", f"output s3://{locked_bucket}/out: "),
    ]
    for source, output, named in cases:
        argv = ["--config", "configs/tiny-random.yaml", "--prompts", source, "--output", output, *sets]
        assert main(argv) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert named in err, err
        assert "ACCESS_DENIED" in err or "AccessDenied" in err or "not found" in err, err
        assert "check the URI, the endpoint and your access" in err or "try configs/prompts/sample.jsonl" in err, err
    session = boto3.session.Session()  # not the default session: that one holds the earlier credentials
    assert not objects(session.client("s3", endpoint_url=s3_endpoint), "out/x")  # nothing started


def test_a_second_job_on_a_busy_s3_output_is_refused(ray_cluster, fast_overrides, s3_endpoint, bucket, tmp_path,
                                                     capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"b{i}", "prompt": f"shape {i}", "seed": i}) + "\n"
                               for i in range(24)))
    sets = [a for o in [*fast_overrides, "ray.batch_size=1", f"storage.endpoint_url={s3_endpoint}"]
            for a in ("--set", o)]
    argv = ["--config", "configs/tiny-random.yaml", "--prompts", str(prompts), "--output", "s3://bucket/busy", *sets]
    first = subprocess.Popen([sys.executable, "-m", "workflows.generate", *argv],
                             env={**os.environ, "RAY_ADDRESS": ray_cluster.address}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not objects(bucket, "busy/_lease.json"):
        assert time.monotonic() < deadline and first.poll() is None, "the first job took no lease"
        time.sleep(0.2)
    holder = json.loads(objects(bucket, "busy/_lease.json")["busy/_lease.json"])
    assert main(argv) == EXIT_BAD_INPUT
    refusal = capsys.readouterr().err
    assert f"is being written by another job (run {holder['run_id']} on host {holder['host']}" in refusal
    assert first.wait(timeout=300) == 0, first.stdout.read()
    filesystem, path = resolve("s3://bucket/busy/metadata", s3_endpoint)
    keys = [(r["prompt_id"], r["seed"]) for r in pq.read_table(path, filesystem=filesystem).to_pylist()]
    assert len(keys) == len(set(keys)) == 24  # one row per image
    assert not objects(bucket, "busy/_lease.json")  # given back
