"""The web app's server (`python -m sample.app`) through its HTTP endpoints, with urllib, on a tiny random bundle.

What the page relies on: PNG data URLs of the model's size with CLIP scores, the same images the Pipeline gives,
bad input answered 400 with one sentence, oversized and undecodable uploads refused in one, a server that keeps
answering after a failure and serves two requests at once, and search that only ever reads the folders named at
start. The page itself is driven in a real browser by tests/test_app_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_mini_impl.errors import run_cli
from sample.app import MAX_BODY, PAGE, App, AppServer, load_models, main, png_url
from tests.bundle_factory import make_tiny_bundle

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16  # the tiny bundle's images (tests/bundle_factory.py)

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def running(app: App):
    """The app's server on a free port of 127.0.0.1, in a thread; yields its address."""
    server = AppServer(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


def make_search_folder(folder: Path) -> Path:
    """Three solid-color PNGs (one in a subfolder) and a file that is not an image."""
    (folder / "more").mkdir(parents=True)
    Image.new("RGB", (20, 16), "red").save(folder / "red.png")
    Image.new("RGB", (16, 16), "blue").save(folder / "blue.png")
    Image.new("RGB", (16, 24), "green").save(folder / "more" / "green.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def app(bundle, tmp_path_factory) -> App:
    root = tmp_path_factory.mktemp("app")
    return App(load_models([str(bundle)], device="cpu"), [make_search_folder(root / "pictures")], root / "indexes")


@pytest.fixture(scope="module")
def url(app):
    with running(app) as address:
        yield address


def post(url: str, path: str, body: dict | bytes) -> tuple[int, dict]:
    """POST JSON (a dict, or raw bytes as they are): (status, the answer's JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path.lstrip("/"), data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url + path.lstrip("/"), timeout=60) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def decode_png(data_url: str) -> Image.Image:
    header, _, payload = data_url.partition(",")
    assert header == "data:image/png;base64"
    data = base64.b64decode(payload)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_one_sentence(status: int, answer: dict, expected_status: int = 400, *words: str) -> None:
    assert status == expected_status, answer
    message = answer["error"]
    assert "Traceback" not in message and "\n" not in message and message.count("; ") <= 2, message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------------------------
# The page and what it is told
# ----------------------------------------------------------------------------------------------


def test_page_is_served_with_a_policy_that_allows_only_this_server(url):
    status, html, headers = get(url, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<title>dalle-mini-impl</title>" in html
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # nothing on the page names another host: no external font, script, style or image
    assert b"http://" not in html and b"https://" not in html and b"//cdn" not in html


def test_info_offers_the_bundle_defaults_methods_and_search_folders(url, app):
    status, body, _ = get(url, "/api/info")
    info = json.loads(body)
    assert status == 200
    [model] = info["models"]
    sample = app.models[0].pipe.cfg.sample
    assert model["image_size"] == SIZE and model["clip"] is True
    assert model["defaults"] == {
        "num_images": sample.num_images,
        "candidates": sample.candidates,
        "guidance_scale": sample.guidance_scale,
        "guidance_until": sample.guidance_until,
        "temperature": sample.temperature,
        "top_k": sample.top_k,
        "top_p": sample.top_p,
        "seed": sample.seed,
    }
    assert model["methods"] == ["ar", "clip-guided"]  # no unCLIP parts in this bundle
    assert info["folders"] == [{"name": "pictures", "images": 3}]  # notes.txt is not an image
    assert info["prompt"] == "a red circle"


def test_unknown_paths_are_404_with_a_sentence(url):
    for path in ("/nothing", "/static/app.html", "/../../etc/passwd", "/api/info/../../sample/app.py"):
        status, body, _ = get(url, path)
        assert status == 404 and "error" in json.loads(body), path
    assert post(url, "/api/nothing", {})[0] == 404


def test_the_server_listens_on_an_ipv6_loopback_address_too(app):
    """Once `--host ::1` was "Address family for hostname not supported" (the socket was always IPv4)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback address to listen on")
    server = AppServer(app, "::1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.url.startswith("http://[::1]:")
        status, body, _ = get(server.url, "/api/info")
        assert status == 200 and "models" in json.loads(body)
    finally:
        server.shutdown()
        server.server_close()


def test_methods_the_server_does_not_answer_are_json_too(url):
    """Once http.server's own HTML page (501) for a PUT or HEAD, where every /api/ answer is said to be JSON."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    for method in ("PUT", "DELETE", "HEAD"):
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
        connection.request(method, "/api/generate", body=b"{}" if method == "PUT" else None)
        answer = connection.getresponse()
        body = answer.read()
        assert answer.status == 501 and answer.getheader("Content-Type") == "application/json", method
        if method == "HEAD":
            assert body == b""
        else:
            assert_one_sentence(501, json.loads(body), 501, f"does not answer {method} requests")
        connection.close()


def test_requests_a_page_elsewhere_could_make_are_refused(url):
    # a page on another site that points its own name at 127.0.0.1 (DNS rebinding) to read the answers
    request = urllib.request.Request(url + "api/info", headers={"Host": "evil.example:7860"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 403 and "evil.example" in json.loads(refused.value.read())["error"]
    # a form or no-cors fetch from another site can send text/plain without asking CORS first; JSON needs to ask
    body = json.dumps({"model": 0, "prompt": "a red circle"}).encode()
    request = urllib.request.Request(url + "api/generate", data=body, headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 415 and "application/json" in json.loads(refused.value.read())["error"]
    localhost = urllib.request.Request(url.replace("127.0.0.1", "localhost") + "api/info")
    assert urllib.request.urlopen(localhost, timeout=60).status == 200


# ----------------------------------------------------------------------------------------------
# Generating and editing
# ----------------------------------------------------------------------------------------------


def test_generate_answers_pngs_of_the_models_size_the_pipeline_would_give(url, app):
    status, answer = post(
        url, "/api/generate", {"model": 0, "prompt": "a red circle", "num_images": 3, "candidates": "5", "seed": 7}
    )
    assert status == 200, answer
    images = answer["images"]
    assert [r["rank"] for r in images] == [1, 2, 3] and {r["seed"] for r in images} == {7}
    scores = [r["clip_score"] for r in images]
    assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)
    direct = app.models[0].pipe.generate(["a red circle"], num_images=3, candidates=5, seed=7, progress=False)[0]
    for r, expected in zip(images, direct):
        image = decode_png(r["png"])
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(expected.image))
        assert r["clip_score"] == pytest.approx(expected.clip_score)


def test_generate_answers_the_pipelines_warnings_with_its_images(url, capsys):
    """Once: four copies of one image came back with nothing on the page (the warning went to the server's log)."""
    status, answer = post(url, "/api/generate", {"model": 0, "prompt": "a red circle", "top_k": 1, "seed": 0})
    assert status == 200, answer
    assert len(answer["images"]) == 2 and len({r["png"] for r in answer["images"]}) == 1
    (said,) = answer["warnings"]
    assert said.startswith("prompt 'a red circle' gave only 1 distinct image in") and "images repeat" in said
    assert f"warning: {said}" in capsys.readouterr().err  # the server's log still has it
    status, answer = post(url, "/api/generate", {"model": 0, "prompt": "a red circle", "seed": 0})
    assert status == 200 and answer["warnings"] == [] and len({r["png"] for r in answer["images"]}) == 2


@pytest.mark.parametrize("path", ["/api/generate", "/api/edit"])
def test_a_request_whose_client_leaves_is_stopped_and_frees_the_model(url, app, capsys, path):
    """The page's Stop (or a closed tab) once left the server sampling thousands of candidates for no one, and every
    later request of the model waited behind them (81 s in a review)."""
    import socket
    import time

    request = {"model": 0, "prompt": "a red circle", "candidates": 10000, "num_images": 1}
    if path == "/api/edit":
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[:, SIZE // 2 :] = 255
        request |= {"image": png_url(Image.new("RGB", (SIZE, SIZE), "red")), "mask": png_url(Image.fromarray(mask))}
    body = json.dumps(request).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    lock = app.models[0].lock
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as client:
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while not lock.locked():  # sampling has begun
            assert time.monotonic() < deadline, "the server never started sampling"
            time.sleep(0.005)
    deadline = time.monotonic() + 60
    while lock.locked():  # the client is gone: the server stops and lets go of the model
        assert time.monotonic() < deadline, "the server sampled on for a client that had left"
        time.sleep(0.01)
    assert f"stopped: POST {path}: the client left before the answer" in capsys.readouterr().err
    status, answer = post(url, "/api/generate", {"model": 0, "prompt": "a red circle", "seed": 0})
    assert status == 200 and len(answer["images"]) == 2


def test_a_client_is_gone_only_once_it_closed_its_end_whatever_its_descriptor():
    """select() cannot watch descriptor 1024 or more, and its ValueError was read as "gone": a server with that many
    files open stopped every request."""
    import resource
    import socket
    import struct
    import time

    from sample.app import client_left

    room = resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1600  # for descriptor 1500 (this machine's: 20,000)
    for number in (None, 1500) if room else (None,):
        server_end, client = socket.socketpair()
        if number is not None:
            os.dup2(server_end.detach(), number)
            server_end = socket.socket(fileno=number)
        with server_end:
            assert not client_left(server_end)
            client.sendall(b"\r\n")  # more bytes after the request: still there
            assert not client_left(server_end)
            server_end.recv(2)
            client.close()
            assert client_left(server_end)
    # a reset (a client that closes with SO_LINGER 0, as a killed one may): gone as well
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        server_end, _ = listener.accept()
        with server_end:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            deadline = time.monotonic() + 10
            while not client_left(server_end):
                assert time.monotonic() < deadline, "a reset connection was taken for a live one"


def test_a_bad_prompt_or_setting_is_400_with_the_pipelines_sentence(url):
    cases = [
        # named as the page names them (once as the command line's flags, "--temperature", which the page lacks)
        ({"prompt": "a red circle", "temperature": 0}, "the setting temperature is 0.0; it must be above 0"),
        ({"prompt": "a red circle", "temperature": "-1"}, "the setting temperature is -1.0"),
        ({"prompt": "a red circle", "top_p": "1.5"}, "the setting top_p is 1.5"),
        ({"prompt": "a red circle", "num_images": 9, "candidates": 2}, "the setting num_images 9 is above the setting"),
        ({"prompt": "a red circle", "candidates": "many"}, "candidates"),
        ({"prompt": "a red circle", "num_images": "2.5"}, "whole number"),
        ({"prompt": "a red circle", "temperature": 10**400}, "give a number"),  # too large for a float
        ({"prompt": "a red circle", "method": "magic"}, "method"),
        ({"prompt": "   "}, "empty"),
        ({"prompt": ["a", "list"]}, "prompt"),
    ]
    for body, word in cases:
        assert_one_sentence(*post(url, "/api/generate", {"model": 0, **body}), 400, word)
    for model in ("/etc", "0", 1, -1, True, None):  # the page picks models by index, never by path
        assert_one_sentence(*post(url, "/api/generate", {"model": model, "prompt": "a red circle"}), 400, "model")
    assert_one_sentence(*post(url, "/api/generate", b"{not json"), 400, "JSON")
    assert_one_sentence(*post(url, "/api/generate", b"[1, 2]"), 400, "JSON")
    assert_one_sentence(*post(url, "/api/generate", b"[" * 100_000), 400, "JSON")  # once a RecursionError: 500
    # a negative length is refused at once, not read until the client gives up
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.putrequest("POST", "/api/generate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "-5")
    connection.endheaders()
    answer = connection.getresponse()
    assert_one_sentence(answer.status, json.loads(answer.read()), 400, "no valid Content-Length")
    connection.close()


def test_edit_redraws_only_the_masked_half(url):
    source = np.zeros((SIZE, SIZE, 3), np.uint8)
    source[:, : SIZE // 2] = (220, 30, 30)
    source[:, SIZE // 2 :] = (30, 30, 220)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255  # white: redraw the right half
    body = {
        "model": 0,
        "prompt": "a green square",
        "num_images": 2,
        "candidates": 4,
        "image": png_url(Image.fromarray(source)),
        "mask": png_url(Image.fromarray(mask)),
    }
    status, answer = post(url, "/api/edit", body)
    assert status == 200, answer
    assert len(answer["images"]) == 2
    for r in answer["images"]:
        edited = np.asarray(decode_png(r["png"]))
        assert edited.shape == (SIZE, SIZE, 3)
        assert np.array_equal(edited[:, : SIZE // 2], source[:, : SIZE // 2])  # the kept half, exactly
        assert isinstance(r["clip_score"], float)
    black = png_url(Image.new("L", (SIZE, SIZE), 0))
    assert_one_sentence(*post(url, "/api/edit", {**body, "mask": black}), 400, "white")
    small = png_url(Image.new("L", (8, 8), 255))
    assert_one_sentence(*post(url, "/api/edit", {**body, "mask": small}), 400, "size")


# ----------------------------------------------------------------------------------------------
# Uploads: size and decoding
# ----------------------------------------------------------------------------------------------


def test_an_oversized_request_is_refused_in_one_sentence_and_the_server_carries_on(url):
    payload = base64.b64encode(b"\0" * MAX_BODY).decode()  # 4/3 of the limit once in base64
    body = json.dumps({"model": 0, "image": "data:image/png;base64," + payload, "labels": "a, b"}).encode()
    assert_one_sentence(*post(url, "/api/classify", body), 413, "MB")
    assert post(url, "/api/generate", {"model": 0, "prompt": "a red circle"})[0] == 200


def test_an_undecodable_upload_is_one_sentence(url, imagefolder):
    truncated = (imagefolder.root / "train" / imagefolder.files[imagefolder.corrupt_caption]).read_bytes()
    uploads = {
        "not an image": "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(),
        "truncated": "data:image/png;base64," + base64.b64encode(truncated).decode(),
        "empty": "data:image/png;base64,",
        "not base64": "data:image/png;base64,@@@@",
        "not a data URL": "/etc/passwd",
        "missing": None,
    }
    for what, image in uploads.items():
        status, answer = post(url, "/api/classify", {"model": 0, "image": image, "labels": "circle, square"})
        assert_one_sentence(status, answer, 400, "image")
        assert "upload" in answer["error"], what


def test_labels_are_probabilities_best_first(url):
    image = png_url(Image.new("RGBA", (30, 20), (200, 0, 0, 128)))  # any size and mode, as training data
    status, answer = post(url, "/api/classify", {"model": 0, "image": image, "labels": " circle, square,, triangle "})
    assert status == 200, answer
    labels = answer["labels"]
    assert sorted(label for label, _ in labels) == ["circle", "square", "triangle"]
    probs = [p for _, p in labels]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)
    assert_one_sentence(*post(url, "/api/classify", {"model": 0, "image": image, "labels": " , "}), 400, "labels")
    # a lone surrogate in the JSON: once the text tokenizer's TypeError, a 500
    lone = {"model": 0, "image": image, "labels": "a\ud800, b"}
    assert_one_sentence(*post(url, "/api/classify", lone), 400, "the labels text is not valid UTF-8")
    # a body of thousands of labels held the model's lock for tens of seconds (a million fit in one body); a
    # repeated one was echoed with the whole list, a megabyte of "sentence"
    many = {"model": 0, "image": image, "labels": ",".join(str(i) for i in range(20000))}
    assert_one_sentence(*post(url, "/api/classify", many), 400, "the labels are 20000; give at most 100")
    twice = {"model": 0, "image": image, "labels": ",".join(["circle"] + [f"shape {i}" for i in range(40)] * 2)}
    status, answer = post(url, "/api/classify", twice)
    assert_one_sentence(status, answer, 400, "the label 'shape 0' is given twice; give each label once")
    assert len(answer["error"]) < 100


# ----------------------------------------------------------------------------------------------
# Failures, concurrency, search
# ----------------------------------------------------------------------------------------------


def test_an_internal_failure_is_500_in_one_sentence_and_the_server_carries_on(url, app, monkeypatch, capsys):
    # no input makes the Pipeline fail unexpectedly (it checks them all), so a failure is injected here
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(app.models[0].pipe, "generate", broken)
    assert_one_sentence(*post(url, "/api/generate", {"model": 0, "prompt": "a red circle"}), 500, "RuntimeError")
    assert "out of memory, say" in capsys.readouterr().err  # the traceback goes to the log
    monkeypatch.undo()
    assert post(url, "/api/generate", {"model": 0, "prompt": "a red circle"})[0] == 200


def test_two_requests_at_once_both_get_their_results(url):
    bodies = [{"model": 0, "prompt": "a red circle", "seed": 1}, {"model": 0, "prompt": "a blue square", "seed": 2}]
    answers: list = [None, None]

    def ask(i):
        answers[i] = post(url, "/api/generate", bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (status, answer), body in zip(answers, bodies):
        assert status == 200, answer
        # the same images as the request alone gives: the lock kept the two from mixing their state
        assert answer == post(url, "/api/generate", body)[1]


def test_search_finds_indexed_images_and_reads_nothing_else(url, app):
    Image.new("RGB", (16, 16), "red").save(app.folders[0].parent / "beside.png")  # outside the folder
    Image.new("RGB", (16, 16), "red").save(app.folders[0] / "later.png")  # added after the index was built
    status, answer = post(url, "/api/search", {"model": 0, "folder": 0, "query": "a red square", "k": 10})
    assert status == 200, answer
    names = [r["name"] for r in answer["results"]]
    assert sorted(names) == ["blue.png", "more/green.png", "red.png"]  # every indexed image, nothing else
    for r in answer["results"]:
        assert max(decode_png(r["png"]).size) <= 128 and isinstance(r["score"], float)
    top1 = post(url, "/api/search", {"model": 0, "folder": 0, "query": "a red square", "k": "1"})[1]["results"]
    assert [r["name"] for r in top1] == names[:1]
    for folder in (1, -1, "0", str(app.folders[0]), "/etc", "../", None, 0.0):
        body = {"model": 0, "folder": folder, "query": "a red square"}
        assert_one_sentence(*post(url, "/api/search", body), 400, "folder")
    for k in (0, "x", 2.5):
        assert post(url, "/api/search", {"model": 0, "folder": 0, "query": "red", "k": k})[0] == 400
    assert_one_sentence(*post(url, "/api/search", {"model": 0, "folder": 0, "query": " "}), 400, "query")


def test_a_search_reads_the_index_loaded_at_start_not_the_disk(url, app, monkeypatch):
    """Every query read the whole index again (embeddings.npy, as float32: most of a query's time on a large
    folder); it is read once, when the app indexes the folder."""
    from dalle_mini_impl.clip import uses

    def no_reading(index_dir):
        raise AssertionError(f"the index {index_dir} was read again")

    monkeypatch.setattr(uses, "read_index", no_reading)
    status, answer = post(url, "/api/search", {"model": 0, "folder": 0, "query": "a red square", "k": 3})
    assert status == 200 and len(answer["results"]) == 3, answer


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def test_the_command_prints_its_address_and_serves_every_model(bundle, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "sample.app", "--model", str(bundle), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("http://127.0.0.1:") and address.endswith("/"), proc.stderr.read()
        status, body, _ = get(address, "/api/info")
        assert status == 200
        assert [m["name"] for m in json.loads(body)["models"]] == ["shapes", "emoji", str(bundle)]
        assert get(address, "/")[1] == PAGE.read_bytes()
        assert len(list(tmp_path.glob("dalle-app-index-*"))) == 1  # the search indexes' folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # stopped by SIGTERM (a kill, docker stop) as by Ctrl+C: the folder is gone (it once stayed behind)
    assert proc.returncode == 128 + 15 and list(tmp_path.glob("dalle-app-index-*")) == []


def test_bad_command_lines_are_one_sentence(tmp_path, capsys):
    for argv, word in (
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--search-dir", str(tmp_path / "nowhere"), "--port", "0"], "does not exist"),
        (["--port", "70000"], "--port"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and word in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
