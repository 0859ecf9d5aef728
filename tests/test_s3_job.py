"""The job against a real S3 endpoint on loopback: prompts read from it, images and Parquet written to it,
and a re-run that resumes from it."""

import hashlib
import json

import boto3
import pyarrow.parquet as pq
import pytest

from storage.uris import resolve
from workflows.generate import main


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
    argv = ["--config", "configs/tiny.yaml", "--prompts", "s3://bucket/in/prompts.jsonl", "--output",
            "s3://bucket/out/run1", *[a for o in [*fast_overrides, f"storage.endpoint_url={s3_endpoint}"]
                                      for a in ("--set", o)]]
    assert main(argv) == 0
    images = objects(bucket, "out/run1/images/")
    assert sorted(images) == [f"out/run1/images/p{i}-s{i}.png" for i in range(5)]
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
    assert pq.read_table(path, filesystem=filesystem).num_rows == 5
    assert objects(bucket, "out/run1/images/") == images
