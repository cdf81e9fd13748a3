"""`python -m sample.app`: a local web page for everything the models do, at http://127.0.0.1:7860/.

    python -m sample.app                                          # the shipped shapes and emoji bundles
    python -m sample.app --model runs/mine --search-dir photos/   # plus a bundle of yours, and a folder to search
    python -m sample.app --host 0.0.0.0 --port 8000               # reachable from other machines (no login!)

One page (static/app.html: inline CSS and JS, nothing fetched from the network) over a few JSON endpoints of a
standard-library server, so the core install does not grow:
  GET  /               the page
  GET  /api/info       the models (image size, sampling defaults from the bundle's `sample` section, methods)
                       and the search folders, by index
  POST /api/generate   {model, prompt, settings, method}      -> {images: [{png, clip_score, rank, seed, file}]}
  POST /api/edit       {model, prompt, image, mask, settings} -> the same; mask white = redraw (Pipeline.edit)
  POST /api/classify   {model, image, labels: "a, b"}         -> {labels: [[label, probability]]}, best first
  POST /api/search     {model, folder, query, k}              -> {results: [{name, png, score}]}, best first
Images travel as PNG data URLs; `model` and `folder` are indices into /api/info's lists, so the page never
names a path. The --search-dir folders are indexed at start by each model's CLIP (`clip.uses.build_index`)
into a temporary folder, and only their indexed files are ever read again.

Safe by default: it binds 127.0.0.1; a request body above 8 MB is refused; an uploaded image is decoded with
the training data's checks (`data.streams`: not an image, truncated, too many pixels); a UserError (a bad
prompt or setting, which the Pipeline checks) is answered 400 with its one sentence, anything else 500 with
one sentence and the traceback on stderr, and the server carries on. Torch models are not thread-safe, so
each model has a lock: two tabs sampling at once both get their results, one after the other. Generating and
editing also hold one lock for the whole process, under which the pipeline's warnings (repeated images, a
shortened prompt) are caught and answered beside the images: Python's warning filters are the process's.
A generation or edit whose client leaves (the page's Stop aborts its request; a closed tab) stops at the next
image row (`Pipeline.generate(should_stop=...)`), so the model is free for the next request at once.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import io
import ipaddress
import json
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import traceback
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from dalle_mini_impl.clip.uses import LoadedIndex, build_index, load_index, search
from dalle_mini_impl.data.images import prepare_image, to_rgb
from dalle_mini_impl.data.streams import SKIP_REASONS, UnusableRecord, decode_image
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.pipeline.bundle import bundle_path
from dalle_mini_impl.pipeline.pipeline import Pipeline, Stopped, check_settings
from sample.__main__ import slugify

PAGE = Path(__file__).resolve().parent / "static" / "app.html"
SHIPPED = ("shapes", "emoji")  # the bundles the page offers besides --model
DEFAULT_PROMPT = "a red circle"
MAX_BODY = 8 * 2**20  # bytes of one request; an image of about 6 MB, as base64 in JSON
MAX_DRAINED = 8 * MAX_BODY  # a larger refused body is not read at all: its connection is closed
THUMB = 128  # px: the longer side of a search result's thumbnail
# labels of one request to label an image: each is embedded four times (CLIP's templates) while the model's lock
# is held, so a body of a million labels would keep every other request of the model waiting for tens of minutes
MAX_LABELS = 100
# the sampling settings the page sends, as the bundle's `sample` section types them
SETTINGS = {
    "num_images": int,
    "candidates": int,
    "guidance_scale": float,
    "guidance_until": float,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
}
# a Content-Security-Policy that lets the page reach nothing but this server
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class Refused(UserError):
    """A request refused before it is read, answered with `status`: 413 too large, 415 not JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# What travels: settings, indices and images in the requests' JSON
# ----------------------------------------------------------------------------------------------


def read_number(value, kind: type, what: str) -> int | float:
    """A number the page sent, as a JSON number or as the text of an input field, as `kind` (int or float)."""
    try:
        if isinstance(value, str):
            return kind(value.strip())
        if not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int):
            return kind(value)
    except (ValueError, OverflowError):  # not a number, or an integer too large for a float
        pass
    raise UserError(f"{what} is {value!r}; give {'a whole number' if kind is int else 'a number'}")


def read_settings(body: dict) -> dict:
    """The sampling settings a request gives, typed; blank ones are left out, so that the bundle's defaults
    apply. Their values are the Pipeline's to check."""
    return {
        key: read_number(body[key], kind, f"the setting {key}")
        for key, kind in SETTINGS.items()
        if body.get(key) not in (None, "")
    }


def checked_settings(model: Model, body: dict) -> dict:
    """`read_settings`, the values checked as the page names them ("the setting temperature is 0.0"), not as the
    command line's flags ("--temperature"), which the page has none of."""
    settings = read_settings(body)
    check_settings(dataclasses.replace(model.pipe.cfg.sample, **settings), fields=True)
    return settings


def pick(items: Sequence, value, what: str):
    """items[value] for an index the page sent; anything else (a path, a string, out of range) is a UserError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(items):
        raise UserError(f"{what} {value!r} is not one of the {len(items)} this server offers; pick one from its list")
    return items[value]


def text_field(body: dict, key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise UserError(f"the {key} is {value!r}; type it as text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON): the text tokenizer's TypeError
        raise UserError(f"the {key} text is not valid UTF-8; retype it") from None
    return value


def png_url(image: Image.Image) -> str:
    """An image as a PNG data URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_upload(body: dict, key: str, max_pixels: int) -> Image.Image:
    """The image a request carries as a base64 data URL under `key`, decoded with the training data's checks."""
    value = body.get(key)
    if not isinstance(value, str) or not value.startswith("data:"):
        raise UserError(f"no {key} was sent; upload a PNG or JPEG image first")
    header, _, payload = value.partition(",")
    try:
        if not header.endswith(";base64"):
            raise ValueError
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"the {key} is not a base64 data URL; upload the file again") from None
    try:
        return decode_image(data, max_pixels)
    except UnusableRecord as e:
        raise UserError(f"the {key} cannot be used ({SKIP_REASONS[e.reason]}); upload a PNG or JPEG image") from None


# ----------------------------------------------------------------------------------------------
# The models and what the endpoints do with them
# ----------------------------------------------------------------------------------------------


@dataclass
class Model:
    """One bundle, loaded once, used under its lock (torch modules are not thread-safe)."""

    name: str
    pipe: Pipeline
    indexes: list[LoadedIndex | None] = field(default_factory=list)  # one per search folder; None without CLIP
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict:
        pipe = self.pipe
        methods = ["ar"]
        if pipe.clip is not None:
            methods.append("clip-guided")
            if pipe.unclip is not None and pipe.unclip_prior is not None:
                methods.append("unclip")
        return {
            "name": self.name,
            "image_size": pipe.cfg.data.image_size,
            "defaults": {key: getattr(pipe.cfg.sample, key) for key in SETTINGS},
            "methods": methods,
            "clip": pipe.clip is not None,
        }

    def require_clip(self, what: str) -> None:
        if self.pipe.clip is None:
            raise UserError(f"model '{self.name}' has no CLIP (clip.safetensors), so it cannot {what}; pick another")


def results_json(groups: list[list], said: list[str]) -> dict:
    """One prompt's Results as the page shows them, with what the pipeline warned while making them (fewer
    distinct images than asked, a prompt cut to the model's text length)."""
    return {
        "images": [
            {
                "png": png_url(r.image),
                "clip_score": r.clip_score,
                "rank": r.rank,
                "seed": r.seed,
                "file": f"{slugify(r.prompt)}_s{r.seed}_r{r.rank}.png",  # as python -m sample names it
            }
            for r in groups[0]
        ],
        "warnings": said,
    }


# warnings are caught process-wide, so one request at a time is caught (sampling on a CPU is compute-bound anyway)
WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def caught_warnings(model: Model):
    """Run one model's work holding its lock, and yield the list of the warnings it gave; they are printed to
    the server's log as well."""
    said: list[str] = []
    with WARNINGS_LOCK, model.lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield said
        finally:  # the server's log has them even when the work failed
            said += [str(w.message) for w in caught]
            for message in said:
                print(f"warning: {message}", file=sys.stderr, flush=True)


class App:
    """The models, the search folders and their indexes; one method per endpoint, request dict -> answer dict."""

    def __init__(self, models: list[Model], folders: Sequence[str | Path] = (), index_root: str | Path | None = None):
        self.models = models
        self.folders = [Path(f) for f in folders]
        self.sizes: list[int | None] = [None] * len(self.folders)  # images indexed per folder
        if self.folders and index_root is None:
            raise ValueError("search folders need an index_root to index them into")
        for i, model in enumerate(models):
            model.indexes = []
            for j, folder in enumerate(self.folders):
                index = None
                if model.pipe.clip is not None:  # an index is its CLIP's: one per model and folder
                    out = Path(index_root) / f"model{i}-folder{j}"
                    self.sizes[j] = build_index(model.pipe.clip, folder, out)["n"]
                    index = load_index(out)  # read once: a search read it again per query, most of its time
                model.indexes.append(index)

    def info(self) -> dict:
        return {
            "models": [m.info() for m in self.models],
            "folders": [{"name": f.name or str(f), "images": n} for f, n in zip(self.folders, self.sizes)],
            "prompt": DEFAULT_PROMPT,
        }

    def model(self, body: dict) -> Model:
        return pick(self.models, body.get("model"), "model")

    def generate(self, body: dict, should_stop: Callable[[], bool] | None = None) -> dict:
        """should_stop: asked at each image row (the client gone: the page's Stop, a closed tab); then the
        pipeline's `Stopped` ends the work and frees the model for the next request."""
        model = self.model(body)
        method = body.get("method") or "ar"
        settings = checked_settings(model, body)
        prompt = text_field(body, "prompt")
        with caught_warnings(model) as said:
            groups = model.pipe.generate(
                [prompt], method=str(method), progress=False, should_stop=should_stop, **settings
            )
        return results_json(groups, said)

    def edit(self, body: dict, should_stop: Callable[[], bool] | None = None) -> dict:
        model = self.model(body)
        max_pixels = model.pipe.cfg.data.max_image_pixels
        image, mask = read_upload(body, "image", max_pixels), read_upload(body, "mask", max_pixels)
        settings = checked_settings(model, body)
        prompt = text_field(body, "prompt")
        with caught_warnings(model) as said:
            groups = model.pipe.edit([prompt], image, mask, progress=False, should_stop=should_stop, **settings)
        return results_json(groups, said)

    def classify(self, body: dict) -> dict:
        model = self.model(body)
        model.require_clip("label images")
        image = read_upload(body, "image", model.pipe.cfg.data.max_image_pixels)
        labels = [label.strip() for label in text_field(body, "labels").split(",") if label.strip()]
        if len(labels) > MAX_LABELS:
            raise UserError(f"the labels are {len(labels)}; give at most {MAX_LABELS}, comma-separated")
        with model.lock:
            probs = model.pipe.clip.classify(prepare_image(image, model.pipe.clip.image_size)[None], labels)[0]
        ranked = sorted(zip(labels, probs.tolist()), key=lambda pair: -pair[1])
        return {"labels": [[label, round(p, 4)] for label, p in ranked]}

    def search(self, body: dict) -> dict:
        model = self.model(body)
        j = body.get("folder")
        folder = pick(self.folders, j, "search folder")
        model.require_clip("search images")
        k = read_number(body.get("k", 8), int, "the number of results")
        with model.lock:
            found = search(model.pipe.clip, model.indexes[j], text_field(body, "query"), k=k)
        results = []
        for path, score in found:  # paths the index holds, under the folder given at start
            try:
                thumb = to_rgb(decode_image(path, model.pipe.cfg.data.max_image_pixels))
            except UnusableRecord:  # removed or changed since the index was built
                continue
            thumb.thumbnail((THUMB, THUMB))
            results.append(
                {
                    "name": Path(path).relative_to(folder.resolve()).as_posix(),
                    "png": png_url(thumb),
                    "score": round(score, 4),
                }
            )
        return {"results": results}


ROUTES = {
    "/api/generate": App.generate,
    "/api/edit": App.edit,
    "/api/classify": App.classify,
    "/api/search": App.search,
}
STOPPABLE = (App.generate, App.edit)  # the long ones: stopped when their client leaves


def client_left(connection: socket.socket) -> bool:
    """Whether the client closed its end of a connection whose request was read whole: it is then readable, with
    nothing to read (the page's Stop aborts its fetch; a closed tab closes it too). A client that only shuts its
    sending side after the request looks the same to the server and is taken for gone; the page never does that.
    poll, not select: select cannot watch a descriptor numbered 1024 or more (Windows has no poll, nor that limit)."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(connection, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([connection], [], [], 0)[0])
        return readable and connection.recv(1, socket.MSG_PEEK) == b""
    except ConnectionError:  # reset: gone as well
        return True


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """GET the page or /api/info; POST JSON to the routes. Every answer to /api/ is JSON."""

    server: AppServer
    timeout = 120  # seconds a client may take to send its request

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self.addressed_here():
            return
        if path in ("/", "/index.html"):
            self.send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self.answer(self.server.app.info)
        else:
            self.send_json(404, {"error": f"there is no page at {path}; open / instead"})

    def do_POST(self) -> None:
        if not self.addressed_here():
            return
        route = ROUTES.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_json(404, {"error": f"there is no endpoint {self.path}; the page knows the right ones"})
            return
        if route in STOPPABLE:
            self.answer(lambda: route(self.server.app, self.read_json(), lambda: client_left(self.connection)))
        else:
            self.answer(lambda: route(self.server.app, self.read_json()))

    def addressed_here(self) -> bool:
        """Whether the request names this machine as its host, when the server listens on a loopback address; a
        web page elsewhere that points its own name at 127.0.0.1 to read the answers is refused (403)."""
        host = urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        if _is_loopback(self.server.server_address[0]) and not _is_loopback(host):
            self.send_json(403, {"error": f"this server answers requests to 127.0.0.1, not to '{host}'; open it there"})
            return False
        return True

    def read_json(self) -> dict:
        # only as application/json, which a page elsewhere may send only with a CORS permission, never given here
        if self.headers.get_content_type() != "application/json":
            raise Refused(415, "the request must be sent as application/json; use the page")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            raise UserError("the request has no valid Content-Length; send it again")
        if length > MAX_BODY:
            if length <= MAX_DRAINED:  # read it, so that the client, still sending, hears the answer
                left = length
                while left > 0 and (chunk := self.rfile.read(min(left, 2**20))):
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise Refused(
                413,
                f"the request is {length / 2**20:.1f} MB, above the {MAX_BODY // 2**20} MB limit; "
                "upload a smaller image",
            )
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise UserError("the request is not valid JSON; reload the page and try again") from None
        if not isinstance(body, dict):
            raise UserError("the request is not a JSON object; reload the page and try again")
        return body

    def answer(self, work) -> None:
        """Run work() and send its dict as JSON: 400 with the sentence of a UserError (a Refused's own status),
        500 with one sentence for anything else, its traceback in the log."""
        try:
            self.send_json(200, work())
        except Stopped:  # no one to answer
            print(f"stopped: {self.command} {self.path}: the client left before the answer", file=sys.stderr)
            self.close_connection = True
        except UserError as e:
            self.send_json(getattr(e, "status", 400), {"error": str(e)})
        except Exception as e:  # a bug or a resource limit: one sentence here, the traceback in the log
            print(f"error: {self.command} {self.path} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            self.send_json(500, {"error": f"the server failed on this request ({type(e).__name__}); its log says why"})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The refusals http.server makes itself (a method no do_* serves: 501; a malformed request: 400, 414,
        431) as one JSON sentence too, not its HTML page; the connection is closed after them."""
        self.close_connection = True
        command = getattr(self, "command", None) or ""
        if code == 501:
            sentence = f"this server does not answer {command or 'such'} requests; the page sends GET and POST"
        else:
            sentence = f"the request was refused ({code}: {message or 'bad request'}); send it again from the page"
        if command == "HEAD":  # headers only: a HEAD answer has no body
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            return
        self.send_json(code, {"error": sentence})

    def send_json(self, status: int, payload: dict) -> None:
        self.send(status, json.dumps(payload).encode(), "application/json")

    def send(self, status: int, data: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the tab was closed while its answer was made
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        pass  # no line per request; failures are logged by `answer`


class AppServer(ThreadingHTTPServer):
    """A thread per request (two tabs at once); the App and the page ride along for the handlers."""

    daemon_threads = True

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 7860):
        self.app = app
        self.page = PAGE.read_bytes()
        if ":" in host:  # an IPv6 address (::1, ::): the server's socket must be of that family
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def load_models(names: Sequence[str], device: str = "auto", dtype: str = "fp32") -> list[Model]:
    """One Model per bundle name or folder, each bundle once (the shipped ones by name)."""
    models, seen = [], set()
    for name in names:
        path = bundle_path(name).resolve()
        if path not in seen:
            seen.add(path)
            models.append(Model(str(name), Pipeline.from_pretrained(name, device=device, dtype=dtype)))
    return models


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sample.app", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME_OR_FOLDER",
        help=f"a bundle the page offers besides the shipped {', '.join(SHIPPED)} (repeat for more)",
    )
    p.add_argument(
        "--search-dir", action="append", default=[], metavar="FOLDER", help="a folder of images the page can search"
    )
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860; 0: any free one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port is {args.port}; pass a port from 1 to 65535, or 0 for any free one")
    for folder in args.search_dir:  # before the models load: a typo is told at once
        if not Path(folder).is_dir():
            raise UserError(f"--search-dir '{folder}' does not exist or is not a folder; pass a folder of images")
    models = load_models([*SHIPPED, *args.model], args.device, args.dtype)
    try:
        return serve(args, models)
    except Terminated as stop:  # the index folder is gone; no interpreter teardown under worker threads after it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code)


class Terminated(SystemExit):
    """SIGTERM, raised in the serving thread so that every `with` block exits (the index folder removed)."""


def serve(args, models: list[Model]) -> int:
    """Index the search folders into a temporary folder and serve until Ctrl+C or SIGTERM."""

    # a kill, docker stop or systemd stop sends SIGTERM, whose default skips every `with` block's exit (the index
    # folder stayed in the temp dir): from before the indexing (minutes on a large folder), it ends the server as
    # Ctrl+C does, the folder removed
    def terminated(signum, frame):
        raise Terminated(128 + signum)

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        with tempfile.TemporaryDirectory(prefix="dalle-app-index-") as index_root:
            app = App(models, args.search_dir, index_root)
            try:
                server = AppServer(app, args.host, args.port)
            except OSError as e:  # the port is taken, the address is not this machine's
                raise UserError(
                    f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pass another --host or --port"
                ) from None
            if not _is_loopback(args.host):
                print(
                    f"warning: the app is reachable from other machines at {server.url}; it has no login",
                    file=sys.stderr,
                )
            print(server.url, flush=True)
            with server:
                server.serve_forever()
    finally:
        signal.signal(signal.SIGTERM, before)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    run_cli(main)
