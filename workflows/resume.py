"""What a run still has to generate: every prompt's images, less what the output already holds.

The metadata under `{output}/metadata` is the single record of what is done: a (prompt_id, seed) with an
`ok` row whose image exists is skipped, so a crashed, pre-empted or repeated job continues where it stopped
and never writes an image, or its row, twice.
"""

import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs

from storage.metadata import METADATA_DIR
from storage.prompts import derived_seed
from storage.uris import join, resolve

log = logging.getLogger(__name__)
QUARANTINE = "_unreadable"


def expand_images(prompts: pa.Table, images_per_prompt: int) -> pa.Table:
    """One row per image: the prompt's own seed first, then seeds derived from it."""
    if images_per_prompt == 1:
        return prompts
    rows = [{**row, "seed": derived_seed(row["seed"], j) if row["error"] is None else row["seed"]}
            for row in prompts.to_pylist() for j in range(images_per_prompt)
            if j == 0 or row["error"] is None]
    return pa.Table.from_pylist(rows, schema=prompts.schema)


def mark_duplicates(prompts: pa.Table) -> pa.Table:
    """A (prompt_id, seed) seen before in the file becomes an error row: its image would overwrite the first."""
    seen: set[tuple[str, int]] = set()
    errors = prompts.column("error").to_pylist()
    for i, (pid, seed) in enumerate(zip(prompts.column("prompt_id").to_pylist(), prompts.column("seed").to_pylist(),
                                        strict=True)):
        if errors[i] is not None:
            continue
        if (pid, seed) in seen:
            errors[i] = (f"duplicate id {pid!r} with seed {seed}: an earlier row already generates this image; "
                         "give each prompt a unique id, or a different seed")
        seen.add((pid, seed))
    return prompts.set_column(prompts.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))


def completed_keys(output: str, endpoint_url: str | None = None) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(prompt_id, seed) of every `ok` row in the output's metadata whose image is still there, and of every
    row at all (so a malformed input row is reported once, not once per run).

    A metadata file that cannot be read (a write cut off by a crash) is moved to `metadata/_unreadable/`,
    which readers skip; its images are regenerated, byte for byte, by this run.
    """
    filesystem, root = resolve(output, endpoint_url)
    folder = join(root, METADATA_DIR)
    infos = filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
    images = {posixpath.basename(i.path) for i in filesystem.get_file_info(
        fs.FileSelector(join(root, "images"), recursive=True, allow_not_found=True)) if i.type == fs.FileType.File}
    done: set[tuple[str, int]] = set()
    recorded: set[tuple[str, int]] = set()
    for info in infos:
        if info.type != fs.FileType.File or not info.base_name.endswith(".parquet") or info.base_name[0] in "._":
            continue
        try:
            table = pq.read_table(info.path, filesystem=filesystem, columns=["prompt_id", "seed", "status",
                                                                             "image_uri"])
        except (OSError, pa.ArrowInvalid) as exc:
            target = join(folder, QUARANTINE, info.base_name)
            log.warning("metadata file %s is unreadable (%s); moving it to %s", info.path, exc, target)
            filesystem.create_dir(join(folder, QUARANTINE))
            filesystem.move(info.path, target)
            continue
        recorded.update(zip(table["prompt_id"].to_pylist(), table["seed"].to_pylist(), strict=True))
        ok = table.filter(pc.equal(table["status"], "ok"))
        for pid, seed, uri in zip(ok["prompt_id"].to_pylist(), ok["seed"].to_pylist(), ok["image_uri"].to_pylist(),
                                  strict=True):
            if posixpath.basename(uri) in images:
                done.add((pid, seed))
    return done, recorded


def pending(prompts: pa.Table, done: set[tuple[str, int]], recorded: set[tuple[str, int]]) -> pa.Table:
    """The rows still to generate or report: valid rows without an ok image, input errors not yet recorded."""
    if not recorded:
        return prompts
    keep = [(pid, seed) not in (done if error is None else recorded) for pid, seed, error in zip(
        prompts["prompt_id"].to_pylist(), prompts["seed"].to_pylist(), prompts["error"].to_pylist(), strict=True)]
    return prompts.filter(pa.array(keep, pa.bool_()))
