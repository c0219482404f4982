import itertools
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cogvideo.metrics import psnr
from cogvideo.tokenizers import patch_vq
from cogvideo.tokenizers.image import ImageTokenizer
from cogvideo.tokenizers.loading import load_image_tokenizer
from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer, held_out_split, kmeans, main, read_frames
from cogvideo.tokenizers.patch_vq import PatchVQTokenizer, context_codes, context_keys

SIZE, SIDE = 32, 4
COLOURS = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 220, 40], [200, 60, 220], [250, 140, 30]]
)
BACKGROUND = np.array([18, 18, 28])


def shape_frames(count: int, seed: int, size: int = SIZE) -> np.ndarray:
    """A circle, square or triangle of one of 6 colours on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    frames = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        side = rng.uniform(0.3, 0.5) * size
        cx, cy = rng.uniform(side / 2 + 1, size - side / 2 - 1, 2)
        t = (yy - cy + side / 2) / side
        mask = [
            (xx - cx) ** 2 + (yy - cy) ** 2 <= (side / 2) ** 2,
            (abs(xx - cx) <= side / 2) & (abs(yy - cy) <= side / 2),
            (t >= 0) & (t <= 1) & (abs(xx - cx) <= t * side / 2),
        ][rng.integers(3)]
        frames[i] = np.where(mask[..., None], COLOURS[rng.integers(6)], BACKGROUND)
    return frames


@pytest.fixture(scope="module")
def fitted():
    return fit_patch_tokenizer(
        shape_frames(400, seed=0),
        codebook_size=128,
        frame_size=SIZE,
        tokens_side=SIDE,
        iterations=8,
        preset="small",
    )


def cut(frame: np.ndarray, r: int, c: int, p: int) -> np.ndarray:
    return frame[r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1)


def reference_encode(tokenizer: PatchVQTokenizer, frames: np.ndarray) -> np.ndarray:
    """Brute force in float64: pixel distance + colour_weight * p*p * mean-colour distance."""
    p, book = tokenizer.patch_size, tokenizer.codebook().astype(np.float64)
    book_mean = book.reshape(len(book), -1, 3).mean(1)
    codes = np.empty((len(frames), SIDE, SIDE), np.int64)
    for t, frame in enumerate(frames.astype(np.float64)):
        for r in range(SIDE):
            for c in range(SIDE):
                patch = cut(frame, r, c, p)
                colour = ((book_mean - patch.reshape(-1, 3).mean(0)) ** 2).sum(1)
                codes[t, r, c] = np.argmin(
                    ((book - patch) ** 2).sum(1) + tokenizer.colour_weight * p * p * colour
                )
    return codes


def context_of(padded: np.ndarray, t: int, r: int, c: int) -> tuple:
    """(code, up, down, left, right) at row r, column c of frame t, from codes padded by one."""
    return (
        padded[t, r + 1, c + 1],
        padded[t, r, c + 1],
        padded[t, r + 2, c + 1],
        padded[t, r + 1, c],
        padded[t, r + 1, c + 2],
    )


def reference_context(codes: np.ndarray, frames: np.ndarray, p: int, outside: int) -> dict:
    """(code, up, down, left, right) -> mean patch, with a dictionary."""
    padded = np.pad(codes, ((0, 0), (1, 1), (1, 1)), constant_values=outside)
    groups: dict = {}
    for t in range(len(codes)):
        for r in range(SIDE):
            for c in range(SIDE):
                key = context_of(padded, t, r, c)
                groups.setdefault(key, []).append(cut(frames[t], r, c, p).astype(np.float64))
    return {key: np.mean(patches, 0) for key, patches in groups.items()}


def test_round_trip_matches_reference_and_keeps_quality(fitted):
    held_out = shape_frames(100, seed=1)
    codes = fitted.encode(held_out)
    assert isinstance(fitted, ImageTokenizer)
    assert codes.dtype == np.int64 and codes.shape == (100, SIDE, SIDE)
    np.testing.assert_array_equal(codes, reference_encode(fitted, held_out))

    decoded = fitted.decode(codes)
    assert decoded.dtype == np.uint8 and decoded.shape == held_out.shape
    # measured 21.1-21.2 dB over fit seeds 0-1 (K=128, 8x8 patches); the mean frame gives 15.2 dB
    mean_frame = np.broadcast_to(held_out.mean(0).round().astype(np.uint8), held_out.shape)
    assert psnr(held_out, decoded) > 20.5
    assert psnr(held_out, decoded) > psnr(held_out, mean_frame) + 5


def test_context_table_decodes_mean_training_patch_of_the_context(fitted):
    train, held_out = shape_frames(400, seed=0), shape_frames(100, seed=1)
    p, book, outside = fitted.patch_size, fitted.codebook(), fitted.codebook_size
    table = reference_context(fitted.encode(train), train, p, outside)
    codes = fitted.encode(held_out)
    decoded = fitted.decode(codes)
    padded = np.pad(codes, ((0, 0), (1, 1), (1, 1)), constant_values=outside)
    seen = 0
    for t in range(len(codes)):
        for r in range(SIDE):
            for c in range(SIDE):
                key = context_of(padded, t, r, c)
                seen += key in table
                expected = table[key] if key in table else book[codes[t, r, c]]
                np.testing.assert_allclose(
                    cut(decoded[t], r, c, p), np.clip(np.round(expected), 0, 255), atol=1
                )
    assert seen > 0.5 * codes.size
    # A context's mean patch is the least-squares patch for its training positions, so on the
    # training frames the table must beat the codes' own patches (measured 36.5 vs 21.4 dB);
    # on held-out frames it measured +0.2 dB with only 400 training frames.
    without = PatchVQTokenizer(book, SIZE, SIDE, colour_weight=fitted.colour_weight)
    train_codes = fitted.encode(train)
    assert psnr(train, fitted.decode(train_codes)) > psnr(train, without.decode(train_codes)) + 10
    assert psnr(held_out, decoded) > psnr(held_out, without.decode(codes))


def test_codes_are_crisp_training_patches(fitted):
    train = shape_frames(400, seed=0)
    p = fitted.patch_size
    patches = {
        tuple(train[t, r : r + p, c : c + p].reshape(-1))
        for t in range(len(train))
        for r in range(0, SIZE, p)
        for c in range(0, SIZE, p)
    }
    assert all(tuple(code.astype(np.uint8)) in patches for code in fitted.codebook())


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 255, (8, 12))
    points = np.concatenate([c + rng.normal(0, 2.0, (200, 12)) for c in centres])
    found = kmeans(torch.tensor(points, dtype=torch.float32), 8, iterations=10).numpy()
    distance = np.sqrt(((found[:, None] - centres[None]) ** 2).sum(-1))
    assert sorted(distance.argmin(1)) == list(range(8))  # one centre per cluster
    assert distance.min(1).max() < 1.5  # bf16 distances, fp32 means


def test_save_load_safetensors(fitted, tmp_path):
    path = tmp_path / "tok" / "patch.safetensors"
    fitted.save(path)
    with safe_open(str(path), "np") as handle:  # plain safetensors: a codebook and metadata
        assert sorted(handle.keys()) == ["codebook", "context_keys", "context_patches"]
        assert handle.metadata()["frame_size"] == "32" and handle.metadata()["tokens_side"] == "4"
        assert float(handle.metadata()["colour_weight"]) == fitted.colour_weight > 0
    loaded = load_image_tokenizer(path, frame_size=SIZE)
    assert isinstance(loaded, PatchVQTokenizer) and loaded.codebook_size == 128
    np.testing.assert_array_equal(loaded.codebook(), fitted.codebook())
    frames = shape_frames(5, seed=2)
    np.testing.assert_array_equal(loaded.encode(frames), fitted.encode(frames))
    np.testing.assert_array_equal(loaded.decode(loaded.encode(frames)), fitted.decode(fitted.encode(frames)))
    with pytest.raises(ValueError, match=r"fitted for 32px frames, expected 48px"):
        load_image_tokenizer(path, frame_size=48)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        PatchVQTokenizer.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        PatchVQTokenizer.load(tmp_path / "junk.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: metadata 'format' is None"):
        PatchVQTokenizer.load(tmp_path / "other.safetensors")
    save_file(
        {"codebook": torch.zeros(4, 10)},
        str(tmp_path / "shape.safetensors"),
        metadata={"format": "cogvideo-patch-vq", "frame_size": "32", "tokens_side": "4"},
    )
    with pytest.raises(
        ValueError, match=re.escape("shape.safetensors: codebook: expected [codebook_size, 192]")
    ):
        PatchVQTokenizer.load(tmp_path / "shape.safetensors")
    save_file(
        {"codebook": torch.zeros(4, 192), "context_keys": torch.zeros(3, dtype=torch.int64)},
        str(tmp_path / "half.safetensors"),
        metadata={"format": "cogvideo-patch-vq", "frame_size": "32", "tokens_side": "4"},
    )
    with pytest.raises(
        ValueError,
        match=r"half.safetensors: expected tensors 'codebook' \(\+ 'context_keys' and "
        r"'context_patches'\), found \['codebook', 'context_keys'\]",
    ):
        PatchVQTokenizer.load(tmp_path / "half.safetensors")


def test_bad_input_says_what_was_expected(fitted):
    with pytest.raises(ValueError, match=r"expected uint8 \[T, 32, 32, 3\], got uint8 \[2, 48, 48, 3\]"):
        fitted.encode(shape_frames(2, seed=0, size=48))
    with pytest.raises(ValueError, match=r"expected uint8 \[T, 32, 32, 3\], got float64"):
        fitted.encode(shape_frames(2, seed=0).astype(np.float64))
    with pytest.raises(ValueError, match=r"expected values in \[0, 128\), got \[-1, 0\]"):
        fitted.decode(np.zeros((1, SIDE, SIDE), np.int64) - np.eye(SIDE, dtype=np.int64)[None])
    with pytest.raises(ValueError, match=r"expected an integer array \[T, 4, 4\], got int64 \[1, 16\]"):
        fitted.decode(np.zeros((1, 16), np.int64))
    with pytest.raises(ValueError, match="needs at least as many distinct patches"):
        fit_patch_tokenizer(np.zeros((4, SIZE, SIZE, 3), np.uint8), 8, SIZE, SIDE, preset="small")
    with pytest.raises(ValueError, match="tokens_side: expected a divisor of frame_size=32, got 5"):
        fit_patch_tokenizer(shape_frames(4, seed=0), 8, SIZE, 5, preset="small")
    with pytest.raises(ValueError, match="codebook_size=6001 is above 6000; fit with context=False"):
        fit_patch_tokenizer(shape_frames(4, seed=0), 6001, SIZE, SIDE, preset="small")


def write_mp4(path, frames, fps=8):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_command_fits_from_images_and_videos(tmp_path, capsys):
    frames = shape_frames(160, seed=3, size=64)  # read_frames resizes 64 -> 32
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames[:120]):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i:04d}.png")
    write_mp4(tmp_path / "frames" / "clip.mp4", frames[120:])
    found = read_frames(str(tmp_path / "frames"), SIZE)
    read, sources = found.frames, found.sources
    halved = frames.reshape(160, SIZE, 2, SIZE, 2, 3).astype(np.float64).mean((2, 4))  # 2x2 box filter
    assert read.shape == (160, SIZE, SIZE, 3) and list(sources) == list(range(120)) + [120] * 40
    np.testing.assert_allclose(read[:120], halved[:120], atol=1)
    assert psnr(halved[120:].round().astype(np.uint8), read[120:]) > 25  # lossy mpeg4
    assert read_frames(str(tmp_path / "frames" / "*.png"), SIZE).frames.shape == (120, SIZE, SIZE, 3)

    out = tmp_path / "tok.safetensors"
    main(["preset=small", f"frames={tmp_path / 'frames'}", f"out={out}", "codebook_size=64", "iterations=4"])
    captured = capsys.readouterr()
    printed = captured.out
    assert (
        "reading frames" in captured.err and "4/4" in captured.err
    )  # progress: files, then k-means iterations
    assert "context table" in captured.err
    held_out = re.search(r"held-out PSNR ([\d.]+) dB on (\d+) frames of (\d+) file\(s\): (\S+)", printed)
    assert Path(held_out.group(4).rstrip(",")).parent == tmp_path / "frames"  # the held-out files, named
    assert "Usable: over" in printed and "preset 'small' the demo's tokenizer reaches 27.4 dB" in printed
    assert (
        float(held_out.group(1)) > 19.0 and int(held_out.group(2)) >= 16
    )  # measured 20.4-20.8 dB, seeds 0-2
    fitted = PatchVQTokenizer.load(out)
    assert (fitted.codebook_size, fitted.frame_size, fitted.tokens_side, fitted.preset) == (
        64,
        32,
        4,
        "small",
    )
    with pytest.raises(FileNotFoundError, match="no frames found at .*nothing"):
        read_frames(str(tmp_path / "nothing"), SIZE)


def test_fit_command_takes_its_geometry_from_the_preset_and_refuses_what_does_not_fit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(
            [
                "preset=small",
                f"frames={tmp_path}",
                f"out={tmp_path / 'tok.safetensors'}",
                "codebook_size=4096",
            ]
        )
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "codebook_size: 4096 codes do not fit preset 'small' (vocab.num_image_tokens=512)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as exit:
        main(["preset=small", f"frames={tmp_path / 'nothing'}", f"out={tmp_path / 'tok.safetensors'}"])
    assert exit.value.code == 2 and "no frames found" in capsys.readouterr().err


def test_held_out_split_keeps_files_whole():
    sources = np.repeat(np.arange(10), 20)
    held = held_out_split(sources, 0.1, seed=0)
    assert held.sum() == 20 and len(np.unique(sources[held])) == 1
    assert not set(sources[held]) & set(sources[~held])
    one_file = held_out_split(np.zeros(50, int), 0.1, seed=0)
    assert one_file.sum() == 5
    assert held_out_split(np.zeros(1, int), 0.1, seed=0).sum() == 0


def test_kmeans_on_a_random_subset_of_patches():
    frames = shape_frames(100, seed=4)
    tokenizer = fit_patch_tokenizer(
        frames, 32, SIZE, SIDE, preset="small", iterations=2, max_patches=500, context=False
    )
    p = tokenizer.patch_size
    patches = {tuple(cut(frame, r, c, p)) for frame in frames for r in range(SIDE) for c in range(SIDE)}
    assert tokenizer.context is None and tokenizer.codebook_size == 32
    assert all(tuple(code.astype(np.uint8)) in patches for code in tokenizer.codebook())


def brute_force_mean(tokenizer: PatchVQTokenizer, probs: np.ndarray) -> np.ndarray:
    """float64: decode() of every code map of the grid, weighted by its probability when each
    position draws its code independently from probs [T, n, n, K]."""
    t, n, _, k = probs.shape
    maps = np.array(list(itertools.product(range(k), repeat=n * n)))  # [K ** (n * n), n * n]
    frames = tokenizer.decode(maps.reshape(-1, n, n)).astype(np.float64)
    weights = probs.reshape(t, n * n, k)[:, np.arange(n * n), maps].prod(-1)  # [T, maps]
    return np.einsum("tm,mhwc->thwc", weights, frames)


def mean_tokenizer(seed: int) -> PatchVQTokenizer:
    """K=3 codes of 2 x 2 patches on a 3 x 3 grid: codebook values off the integers and outside
    0..255 (decode rounds and clips them), a context table with the keys of random code maps and
    random keys (some with "outside" on a side that is inside the grid: they never match)."""
    rng = np.random.default_rng(seed)
    k, n = 3, 3
    book = rng.uniform(-20, 275, (k, 12)).astype(np.float32)
    keys = context_keys(rng.integers(0, k, (6, n, n)), k).reshape(-1)
    digits = rng.integers(0, k + 1, (40, 5))
    keys = np.unique(
        np.concatenate(
            [
                keys,
                (
                    (((digits[:, 0] * 4 + digits[:, 1]) * 4 + digits[:, 2]) * 4 + digits[:, 3]) * 4
                    + digits[:, 4]
                ),
            ]
        )
    )
    keys = keys[context_codes(keys, k)[0] < k]  # an entry's own code is a code
    table = rng.integers(0, 256, (len(keys), 12), dtype=np.uint8)
    return PatchVQTokenizer(book, 2 * n, n, context=(keys, table))


def test_the_expected_decode_is_the_probability_weighted_mean_of_every_code_maps_decode():
    """decode_mean against a brute force over all 3 ** 9 code maps of a 3 x 3 grid, in float64."""
    rng = np.random.default_rng(3)
    for seed in range(3):
        tokenizer = mean_tokenizer(seed)
        maps = rng.integers(0, 3, (50, 3, 3))
        without = PatchVQTokenizer(tokenizer.codebook(), 6, 3)
        assert not np.array_equal(tokenizer.decode(maps), without.decode(maps))  # the table is used
        probs = rng.dirichlet(np.full(3, 0.7), (2, 3, 3))
        got = tokenizer.decode_mean(torch.from_numpy(probs))
        assert got.dtype == torch.float64 and got.shape == (2, 6, 6, 3)
        np.testing.assert_allclose(got.numpy(), brute_force_mean(tokenizer, probs), rtol=1e-12, atol=1e-10)


def test_the_expected_decode_of_certain_codes_is_their_decode(fitted, monkeypatch):
    """A one-hot distribution gives exactly decode()'s frame (the fitted tokenizer and its context
    table), also when the positions are weighed a few at a time, and in another dtype."""
    codes = fitted.encode(shape_frames(20, seed=4))
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(codes), fitted.codebook_size).float()
    np.testing.assert_array_equal(fitted.decode_mean(one_hot).numpy(), fitted.decode(codes))
    monkeypatch.setattr(patch_vq, "MEAN_WEIGHTS", 7 * len(fitted.context[0]))  # 7 positions at a time
    np.testing.assert_array_equal(fitted.decode_mean(one_hot).numpy(), fitted.decode(codes))
    # the table's terms are made once per device and dtype: float64 after float32
    np.testing.assert_array_equal(fitted.decode_mean(one_hot.double()).numpy(), fitted.decode(codes))
    with pytest.raises(ValueError, match=r"probs: expected float \[T, 4, 4, 128\]"):
        fitted.decode_mean(one_hot[..., :5])
