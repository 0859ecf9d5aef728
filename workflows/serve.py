"""Serve images online, OpenAI Images API-compatible, with the batch job's model code (`actors.serve`).

    python -m workflows.serve --config configs/tiny.yaml [--port 8000] [--host 127.0.0.1] [--set key=value ...]

Joins the cluster in RAY_ADDRESS (as under `ray job submit`) or starts a local one, runs the application until
Ctrl-C (or SIGTERM), then takes it down. On a cluster, `serve run` / `serve deploy configs/serve/tiny.yaml` build the
same application through `build`. Exit status: 0 after a clean stop, 2 for a config error.
"""

import argparse
import signal
import sys
import threading
from types import FrameType

import ray
from pydantic import BaseModel, ConfigDict
from ray import serve

from actors.serve import build_app
from workflows.config import ConfigError, load_config
from workflows.generate import connect_ray

APP_NAME = "sparsevar"


class BuildArgs(BaseModel):
    """The `args` of an application in a Serve config file (configs/serve/)."""

    model_config = ConfigDict(extra="forbid")

    config: str
    set: list[str] = []


def build(args: BuildArgs) -> serve.Application:
    """Serve's application builder (`import_path: workflows.serve:build`): the config file, with `--set` overrides."""
    return build_app(load_config(args.config, args.set))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job config YAML; its `serve` section sizes the service")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set serve.max_batch_size=8")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs ignoring it
        signal.signal(signum, _interrupt)
    try:  # Ctrl-C while Ray or the application starts stops as cleanly as once serving
        connect_ray()
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        print(f"serving {cfg.model.backend} on http://{args.host}:{args.port} (POST /v1/images/generations); "
              "Ctrl-C stops", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        if ray.is_initialized():
            serve.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
