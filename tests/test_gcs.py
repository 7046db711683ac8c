"""Train, resume and the files of a run on ``gs://``, against a local GCS emulator.

The test starts ``gcp-storage-emulator`` (pure Python, in the ``test`` extra) on
127.0.0.1 and points the clients at it: gcsfs (etils.epath's ``gs://`` backend when
``EPATH_USE_TF=0``) through ``STORAGE_EMULATOR_HOST``, and tensorstore (Orbax's array
storage) through ``TENSORSTORE_GCS_HTTP_URL``.  TensorFlow's own GCS client has no way to
be pointed at an emulator, so event files (written through tf.summary) are turned off here
(``--config.tensorboard=False``); they go through the same ``gfile`` on a real bucket.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import cli_env

BUCKET = "anp-test"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Real GCS sends an object's generation in ``x-goog-generation`` on every media download;
# the emulator does not, so tensorstore (Orbax's OCDBT) would read generation 0 and a later
# conditional write with it fails ("Malformed StorageGeneration", whenever OCDBT re-reads a
# manifest before writing it).  This adds the header, as GCS does.
_GENERATION_HEADERS = """
from gcp_storage_emulator import server as _server
from gcp_storage_emulator.handlers import objects as _objects
_download = _objects.download
def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
_objects.download = _download_with_generation
for _pattern, _methods in _server.HANDLERS:
    for _verb, _fn in list(_methods.items()):
        if _fn is _download:
            _methods[_verb] = _download_with_generation
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    port = _free_port()
    code = (_GENERATION_HEADERS + "import time\nfrom gcp_storage_emulator.server import "
            f"create_server\ns = create_server('127.0.0.1', {port}, in_memory=True, "
            f"default_bucket={BUCKET!r})\ns.start()\nwhile True: time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "EPATH_USE_TF": "0", "GOOGLE_CLOUD_PROJECT": "anp-test"}
    yield env
    proc.kill()
    proc.wait()


def _run(args, data_dir, env_extra):
    env = dict(cli_env(data_dir), **env_extra)
    return subprocess.run([sys.executable, "-m", "anp_jax", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _listing(env_extra, prefix):
    """Every object under ``gs://BUCKET/prefix``, read through gcsfs like the trainer."""
    root = f"gs://{BUCKET}/{prefix}"
    code = ("import json\nfrom etils import epath\n"
            f"root = epath.Path({root!r})\n"
            "def walk(p):\n"
            "    for c in p.iterdir():\n"
            "        yield from walk(c) if c.is_dir() else [str(c)[len(str(root)) + 1:]]\n"
            "files = sorted(walk(root))\n"
            "print(json.dumps(files))\nprint((root / 'metrics.json').read_text())\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env_extra),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    files, metrics = out.stdout.split("\n", 1)
    return json.loads(files), json.loads(metrics)


def test_train_and_resume_on_gcs(emulator, data_dir):
    workdir = f"gs://{BUCKET}/run"
    args = ["train", f"--workdir={workdir}", "--config.tensorboard=False",
            "--config.lr_schedule=constant", "--config.eval.attacks=('fgsm_linf_0.1',)",
            "--config.eval.corruptions=()", "--config.eval_every_epochs=1",
            "--config.eval.curve_examples=32"]
    first = _run([*args, "--config.num_epochs=1"], data_dir, emulator)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not os.path.exists("gs:"), "a local folder named gs: was created"
    resumed = _run([*args, "--config.num_epochs=2"], data_dir, emulator)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint at mini-batch 44" in resumed.stderr
    # A changed config is refused there too, one line.
    refused = _run([*args, "--config.num_epochs=2", "--config.seed=1"], data_dir, emulator)
    assert refused.returncode == 2 and "seed: 0 -> 1" in refused.stderr
    names, metrics = _listing(emulator, "run")
    names = set(names)
    assert {"config.json", "metrics.json", "metrics.jsonl"} <= names
    assert not [n for n in names if n.endswith(".tmp")], names  # written directly there
    steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}
    assert {"44", "88"} <= steps, steps
    assert metrics["batches"] == 88 and metrics["steps"] == 2 * 88
    assert metrics["num_test_examples"] == 359 and 0.0 < metrics["clean_accuracy"] <= 1.0
    # The report's files on gs:// too (anp-jax eval's reading and writing, without its
    # evaluation, which is tested locally in tests/test_report.py).
    code = ("import json\nfrom etils import epath\nfrom anp_jax import report\n"
            "from anp_jax.evaluation.run import read_config\n"
            f"w = {workdir!r}\nconfig, _ = read_config(w)\n"
            "curves = report.write_learning_curves(w, 'title')\n"
            "report.merge_into_metrics(w, {'learning_curves': curves, 'seed': config['seed']})\n"
            "png = (epath.Path(w) / curves['plot']).read_bytes()\n"
            "print(json.dumps([curves['rows'], png[:8].hex()]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(cli_env(data_dir), **emulator),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows, magic = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows >= 2 and magic == b"\x89PNG\r\n\x1a\n".hex()
    names, after = _listing(emulator, "run")
    assert "report/learning_curves.png" in names
    assert after["report"] == {"learning_curves": {"plot": "report/learning_curves.png",
                                                   "rows": rows, "columns": after["report"][
                                                       "learning_curves"]["columns"]},
                               "seed": 0}
    assert {k: v for k, v in after.items() if k != "report"} == metrics
