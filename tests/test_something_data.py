"""Something-Something data pipeline: list parsing, TSN sampling, transforms, bad samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from cakes.datamodules.something import SomethingSomethingDataModule
from cakes.datamodules.video_dataset import SkipNoneCollate, VideoClipDataset
from cakes.datamodules.video_readers import BadSampleError, BadSampleWarning
from cakes.datamodules.video_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TSN_SCALES,
    eval_crop_boxes,
    fixed_crop_offsets,
    flip_label_map,
    multiscale_crop_sizes,
    sample_eval_indices,
    sample_multiscale_crop,
    sample_train_indices,
    segment_bounds,
    train_transform,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
H, W = 32, 48  # fixture frame size
CLASSES = [
    "Pulling something from left to right",
    "Pulling something from right to left",
    "Holding something",
    "Turning the camera left while filming something",
    "Turning the camera right while filming something",
]
SORTED = sorted(CLASSES)
#: video id -> (class, frames); split by id parity: odd = train, even = validation
VIDEOS = {
    "1": (CLASSES[0], 12),
    "2": (CLASSES[1], 16),
    "3": (CLASSES[2], 3),
    "4": (CLASSES[3], 8),
    "5": (CLASSES[4], 20),
    "6": (CLASSES[0], 5),
    "7": (CLASSES[1], 9),
    "8": (CLASSES[2], 24),
}
SMALL = {"num_frames": 4, "crop_size": 16, "test_short_side": 20, "batch_size": 2, "num_workers": 0}


def frame_image(k: int, height: int = H, width: int = W) -> np.ndarray:
    """Frame ``k`` (1-based): red channel = 10 k (identifies the frame), green = left-right ramp."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 10 * k
    image[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image[..., 2] = 128
    return image


def frame_numbers(video: torch.Tensor) -> list[int]:
    """Recover the 1-based frame numbers of a normalised ``(3, T, S, S)`` clip."""
    red = video[0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [round(v / 10) for v in (red * 255).tolist()]


def split_of(video_id: str) -> str:
    return "train" if int(video_id) % 2 else "validation"


def write_v1(root: Path) -> Path:
    """Write the v1 fixture in both list formats (official CSV and TRN lists)."""
    frames_root = root / "20bn-something-something-v1"
    for video_id, (_, n) in VIDEOS.items():
        (frames_root / video_id).mkdir(parents=True)
        for k in range(1, n + 1):
            Image.fromarray(frame_image(k)).save(frames_root / video_id / f"{k:05d}.jpg", quality=95)
    (root / "something-something-v1-labels.csv").write_text("\n".join(CLASSES) + "\n")
    (root / "category.txt").write_text("\n".join(SORTED) + "\n")
    for split, trn in [("train", "train_videofolder.txt"), ("validation", "val_videofolder.txt")]:
        ids = [v for v in VIDEOS if split_of(v) == split]
        (root / f"something-something-v1-{split}.csv").write_text("".join(f"{v};{VIDEOS[v][0]}\n" for v in ids))
        (root / trn).write_text("".join(f"{v} {VIDEOS[v][1]} {SORTED.index(VIDEOS[v][0])}\n" for v in ids))
    return root


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    return write_v1(tmp_path / "ssv1")


def v1_module(root: Path, **kwargs) -> SomethingSomethingDataModule:
    return SomethingSomethingDataModule(root, version="v1", **{**SMALL, **kwargs})


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("n", [8, 9, 15, 17, 100])
def test_segments_tile_the_video(n: int) -> None:
    starts, ends = segment_bounds(n, 8)
    assert starts[0] == 0 and ends[-1] == n
    assert (starts[1:] == ends[:-1]).all() and (ends > starts).all()
    assert (ends - starts).max() - (ends - starts).min() <= 1


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 50])
def test_train_indices_inside_segments(n: int) -> None:
    starts, ends = segment_bounds(n, 8)
    rng = torch.Generator().manual_seed(0)
    draws = np.stack([sample_train_indices(n, 8, rng) for _ in range(300)])
    assert draws.shape == (300, 8)
    assert ((draws >= starts) & (draws < ends)).all()
    assert (np.diff(draws, axis=1) >= 0).all()  # temporal order kept
    if n >= 16:  # every frame of a 2-frame segment is reachable
        assert all(len(np.unique(draws[:, s])) == ends[s] - starts[s] for s in range(8))


def test_eval_indices_are_segment_centres() -> None:
    assert sample_eval_indices(16, 8).tolist() == [[1, 3, 5, 7, 9, 11, 13, 15]]
    assert sample_eval_indices(80, 8).tolist() == [[5, 15, 25, 35, 45, 55, 65, 75]]
    assert sample_eval_indices(8, 8).tolist() == [list(range(8))]
    clips = sample_eval_indices(32, 4, num_clips=2)  # segments of 8: points 2 and 6
    assert clips.tolist() == [[2, 10, 18, 26], [6, 14, 22, 30]]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_short_videos_spread_frames_in_order(n: int) -> None:
    rng = torch.Generator().manual_seed(0)
    for indices in (sample_eval_indices(n, 8)[0], sample_train_indices(n, 8, rng)):
        assert (np.diff(indices) >= 0).all()
        counts = np.bincount(indices, minlength=n)
        assert (counts > 0).all() and counts.max() - counts.min() <= 1  # every frame, evenly
    if n > 1:
        assert sample_eval_indices(n, 8).max() == n - 1  # not TSN's all-frame-1 collapse


# --------------------------------------------------------------------------- spatial
@pytest.mark.parametrize("size", [(100, 176), (240, 427), (64, 80), (176, 100), (20, 20)])
def test_multiscale_crops_within_bounds(size: tuple[int, int]) -> None:
    height, width = size
    short = min(size)
    side_of = {int(short * s): i for i, s in enumerate(TSN_SCALES)}
    rng = torch.Generator().manual_seed(0)
    seen_offsets = set()
    for _ in range(400):
        box = sample_multiscale_crop(height, width, TSN_SCALES, rng)
        assert box.top >= 0 and box.top + box.height <= height
        assert box.left >= 0 and box.left + box.width <= width
        assert abs(side_of[box.height] - side_of[box.width]) <= 1  # max distortion 1
        assert (box.top, box.left) in fixed_crop_offsets(height, width, box.height, box.width)
        seen_offsets.add((box.height, box.width, box.top, box.left))
    assert len({(h, w) for h, w, *_ in seen_offsets}) == len(multiscale_crop_sizes(height, width)) == 10


def test_fixed_offsets_grid() -> None:
    offsets = fixed_crop_offsets(100, 176, 66, 66)
    assert len(offsets) == len(set(offsets)) == 13
    assert {(0, 0), (0, 108), (32, 0), (32, 108), (16, 54)} <= set(offsets)  # corners + centre


def test_eval_crop_boxes_along_long_side() -> None:
    (centre,) = eval_crop_boxes(256, 455, 224, 1)
    assert (centre.top, centre.left) == (16, 115)
    assert [(b.top, b.left) for b in eval_crop_boxes(256, 455, 224, 3)] == [(16, 0), (16, 115), (16, 231)]
    assert [(b.top, b.left) for b in eval_crop_boxes(300, 256, 224, 3)] == [(0, 16), (38, 16), (76, 16)]
    with pytest.raises(ValueError, match="1 or 3"):
        eval_crop_boxes(256, 455, 224, 2)


# --------------------------------------------------------------------------- flip
SSV1_NAMES = [
    "Pulling something from left to right",
    "Pulling something from right to left",
    "Pushing something from left to right",
    "Pushing something from right to left",
    "Turning the camera left while filming something",
    "Turning the camera right while filming something",
    "Moving something and something closer to each other",
    "Turning something upside down",
    "Tearing something into two pieces",
]


def test_flip_label_map_pairs_by_name() -> None:
    names = sorted(SSV1_NAMES)
    mapping = flip_label_map(names)
    pairs = {(names[i], names[j]) for i, j in enumerate(mapping) if i != j}
    assert pairs == {
        (a, b)
        for a, b in [(SSV1_NAMES[0], SSV1_NAMES[1]), (SSV1_NAMES[2], SSV1_NAMES[3]), (SSV1_NAMES[4], SSV1_NAMES[5])]
        for a, b in [(a, b), (b, a)]
    }
    assert [mapping[j] for j in mapping] == list(range(len(names)))  # an involution


def test_train_transform_flip_mirrors_frames() -> None:
    frames = np.stack([frame_image(k) for k in range(1, 5)])
    outcomes = set()
    for seed in range(16):
        plain, was_flipped = train_transform(frames, 16, flip=False, generator=torch.Generator().manual_seed(seed))
        clip, flipped = train_transform(frames, 16, flip=True, generator=torch.Generator().manual_seed(seed))
        assert not was_flipped
        torch.testing.assert_close(clip, plain.flip(-1) if flipped else plain)
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_dataset_flip_swaps_paired_labels_only(v1_root: Path) -> None:
    dm = v1_module(v1_root)
    dm.setup("fit")
    records = dm.train_set.records + dm.val_set.records
    names = dm.class_names
    swapped = {names.index(a): names.index(b) for a, b in [(CLASSES[0], CLASSES[1]), (CLASSES[3], CLASSES[4])]}
    swapped |= {b: a for a, b in swapped.items()}
    kwargs = {"media": "frames", "train": True, "num_segments": 4, "crop_size": 16, "short_side": 20}
    flips = 0
    for seed in range(12):
        for i, record in enumerate(records):  # fresh RNGs per item: the flip draw comes last
            flip_map = flip_label_map(names)
            flipping = VideoClipDataset(records, flip=True, flip_map=flip_map, seed=seed, **kwargs)
            plain = VideoClipDataset(records, flip=False, seed=seed, **kwargs)
            a, b = flipping[i], plain[i]
            assert b["label"] == record.label
            if torch.equal(a["video"], b["video"]):
                assert a["label"] == record.label
            else:
                flips += 1
                torch.testing.assert_close(a["video"], b["video"].flip(-1))
                assert a["label"] == swapped.get(record.label, record.label)
    assert flips > 0


# --------------------------------------------------------------------------- datamodule
def test_v1_csv_batches(v1_root: Path) -> None:
    dm = v1_module(v1_root)
    assert dm.class_names == SORTED and dm.num_classes == 5  # readable before setup
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["index"].dtype == torch.long
    assert batch["skipped"] == 0
    val = list(dm.val_dataloader())
    assert [b["video"].shape for b in val] == [(2, 3, 4, 16, 16)] * 2
    labels = torch.cat([b["label"] for b in val]).tolist()
    ids = [dm.val_set.records[i].video_id for i in torch.cat([b["index"] for b in val]).tolist()]
    assert ids == ["2", "4", "6", "8"]
    assert labels == [SORTED.index(VIDEOS[v][0]) for v in ids]


def test_trn_lists_match_csv(v1_root: Path) -> None:
    csv = v1_module(v1_root)
    trn = v1_module(v1_root, list_format="trn")
    csv.setup("fit")
    trn.setup("fit")
    assert trn.class_names == csv.class_names
    for a, b in [(csv.train_set, trn.train_set), (csv.val_set, trn.val_set)]:
        assert [(r.video_id, r.label) for r in a.records] == [(r.video_id, r.label) for r in b.records]
        assert [r.num_frames for r in b.records] == [VIDEOS[r.video_id][1] for r in b.records]
    for i in range(len(csv.val_set)):  # counted frames == listed frames
        torch.testing.assert_close(csv.val_set[i]["video"], trn.val_set[i]["video"])


def test_eval_reads_segment_centres_and_spreads_short_videos(v1_root: Path) -> None:
    dm = v1_module(v1_root, num_frames=8, test_short_side=16, val_file="something-something-v1-train.csv")
    dm.setup("validate")
    by_id = {r.video_id: i for i, r in enumerate(dm.val_set.records)}
    assert frame_numbers(dm.val_set[by_id["1"]]["video"]) == (sample_eval_indices(12, 8)[0] + 1).tolist()
    short = frame_numbers(dm.val_set[by_id["3"]]["video"])  # 3 frames for 8 segments
    assert short == sorted(short) and set(short) == {1, 2, 3}


def test_train_reads_frames_inside_segments(v1_root: Path) -> None:
    dm = v1_module(v1_root, num_frames=4)
    dm.setup("fit")
    i = next(i for i, r in enumerate(dm.train_set.records) if r.video_id == "5")  # 20 frames
    starts, ends = segment_bounds(20, 4)
    seen = set()
    for _ in range(20):
        numbers = np.array(frame_numbers(dm.train_set[i]["video"])) - 1
        assert ((numbers >= starts) & (numbers < ends)).all()
        seen.add(tuple(numbers))
    assert len(seen) > 1


def test_multi_view_shapes(v1_root: Path) -> None:
    dm = v1_module(v1_root, test_clips=2, test_crops=3, val_clips=1, val_crops=3)
    dm.setup("test")
    dm.setup("validate")
    batch = next(iter(dm.test_dataloader()))
    assert batch["video"].shape == (2, 6, 3, 4, 16, 16)
    assert batch["label"].shape == (2,)
    assert next(iter(dm.val_dataloader()))["video"].shape == (2, 3, 3, 4, 16, 16)
    views = batch["video"][0]
    assert not torch.equal(views[0], views[2])  # left and right crops differ (green ramp)


def test_loader_settings_and_determinism(v1_root: Path) -> None:
    def first_batch(workers: int) -> dict:
        torch.manual_seed(1234)
        dm = v1_module(v1_root, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert loader.persistent_workers is (workers > 0)
        assert loader.pin_memory is False  # CPU only here
        assert loader.drop_last
        return next(iter(loader))

    a, b = first_batch(0), first_batch(0)
    torch.testing.assert_close(a["video"], b["video"])
    assert torch.equal(a["index"], b["index"])
    c, d = first_batch(2), first_batch(2)
    torch.testing.assert_close(c["video"], d["video"])
    assert torch.equal(c["index"], d["index"])


# --------------------------------------------------------------------------- v2
def write_webm(path: Path, num_frames: int) -> None:
    """VP8 webm of 80x48 fixture frames (decord 0.6 mis-sizes some tiny widths, e.g. 48)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libvpx", rate=12)
        stream.width, stream.height, stream.pix_fmt = 80, 48, "yuv420p"
        for k in range(1, num_frames + 1):
            frame = av.VideoFrame.from_ndarray(frame_image(k, 48, 80), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    root = tmp_path / "ssv2"
    (root / "20bn-something-something-v2").mkdir(parents=True)
    templates = [
        "Pushing [something] from left to right",
        "Pushing [something] from right to left",
        "Holding [something]",
    ]
    names = sorted(t.replace("[", "").replace("]", "") for t in templates)
    (root / "something-something-v2-labels.json").write_text(json.dumps({n: str(i) for i, n in enumerate(names)}))
    for split, ids in [("train", ["10", "11", "12"]), ("validation", ["20", "21"])]:
        entries = []
        for j, video_id in enumerate(ids):
            write_webm(root / "20bn-something-something-v2" / f"{video_id}.webm", 6 + 5 * j)
            entries.append({"id": video_id, "label": "a cup", "template": templates[j], "placeholders": ["cup"]})
        (root / f"something-something-v2-{split}.json").write_text(json.dumps(entries))
    return root


def test_v2_webm_batches(v2_root: Path) -> None:
    dm = SomethingSomethingDataModule(v2_root, version="v2", **SMALL)
    assert dm.num_classes == 3
    dm.setup("fit")
    assert [r.label for r in dm.train_set.records] == [1, 2, 0]  # Holding < ... left to right < ... right to left
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
    val = dm.val_set[1]  # 11 frames
    assert val["video"].shape == (3, 4, 16, 16)
    expected = sample_eval_indices(11, 4)[0] + 1
    assert np.abs(np.array(frame_numbers(val["video"])) - expected).max() <= 1  # lossy codec


def test_v2_corrupt_video(v2_root: Path) -> None:
    (v2_root / "20bn-something-something-v2" / "20.webm").write_bytes(b"not a video")
    dm = SomethingSomethingDataModule(v2_root, version="v2", **SMALL)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=r"cannot open video .*20\.webm"):
        dm.val_set[0]


def test_v2_unknown_template(v2_root: Path) -> None:
    path = v2_root / "something-something-v2-train.json"
    entries = json.loads(path.read_text())
    entries[1]["template"] = "Juggling [something]"
    path.write_text(json.dumps(entries))
    dm = SomethingSomethingDataModule(v2_root, version="v2", **SMALL)
    with pytest.raises(ValueError, match=r"train.json:entry 1: class 'Juggling something'"):
        dm.setup("fit")


# --------------------------------------------------------------------------- validation errors
def test_missing_root_labels_and_lists(tmp_path: Path, v1_root: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        v1_module(missing).setup("fit")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        _ = v1_module(missing).num_classes
    (v1_root / "something-something-v1-train.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"something-something-v1-train\.csv"):
        v1_module(v1_root).setup("fit")
    v1_module(v1_root).setup("validate")  # validation needs only the validation list
    (v1_root / "something-something-v1-labels.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels file not found: .*something-something-v1-labels\.csv"):
        v1_module(v1_root).setup("validate")


def test_missing_media_folder(v1_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"media folder not found: .*frames_elsewhere"):
        v1_module(v1_root, media_dir="frames_elsewhere").setup("fit")


TRAIN_CSV = "something-something-v1-train.csv"


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        (TRAIN_CSV, "1;Holding something\n3 Holding something\n", r"train.csv:2: expected '<id>;<class name>'"),
        (TRAIN_CSV, "1;Holding something\n\n3;Dancing\n", r"train.csv:3: class 'Dancing' is not in the labels"),
        (TRAIN_CSV, "1;Holding something\n1;Holding something\n", r"train.csv:2: duplicate video id '1'"),
        (TRAIN_CSV, "../1;Holding something\n", r"train.csv:1: invalid video id"),
        (TRAIN_CSV, "", r"train.csv: no videos listed"),
        ("something-something-v1-labels.csv", "A\nB\nA\n", r"labels.csv:3: duplicate class 'A'"),
    ],
)
def test_malformed_csv(v1_root: Path, file: str, content: str, message: str) -> None:
    (v1_root / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        v1_module(v1_root).setup("fit")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 12 0\n3 3 5\n", r"train_videofolder.txt:2: label index 5 out of range \[0, 5\)"),
        ("1 12 -1\n", r"train_videofolder.txt:1: label index -1 out of range"),
        ("1 12\n", r"train_videofolder.txt:1: expected '<id> <num_frames> <label_idx>'"),
        ("1 twelve 0\n", r"train_videofolder.txt:1: num_frames and label_idx must be integers"),
        ("1 0 0\n", r"train_videofolder.txt:1: num_frames must be positive"),
    ],
)
def test_malformed_trn_list(v1_root: Path, content: str, message: str) -> None:
    (v1_root / "train_videofolder.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        v1_module(v1_root, list_format="trn").setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": "v3"}, "version must be"),
        ({"list_format": "json"}, "list_format for v1"),
        ({"version": "v2", "list_format": "trn"}, "list_format for v2"),
        ({"bad_sample": "ignore"}, "bad_sample must be"),
        ({"test_crops": 2}, "test_crops must be 1 or 3"),
        ({"crop_size": 32, "test_short_side": 20}, r"test_short_side \(20\) must be >= crop_size"),
        ({"train_scales": [1.0, 1.5]}, "train_scales"),
        ({"num_frames": 0}, "num_frames must be positive"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SomethingSomethingDataModule(tmp_path, **{**SMALL, **kwargs})


def test_validate_checks_every_file_before_setup(v1_root: Path) -> None:
    dm = v1_module(v1_root, num_classes=5)
    dm.validate()
    (v1_root / "something-something-v1-validation.csv").write_text("2;Holding something\n4;Juggling\n")
    with pytest.raises(ValueError, match=r"validation.csv:2: class 'Juggling'"):
        dm.validate()
    with pytest.raises(ValueError, match=r"labels.csv: 5 classes, but num_classes=174"):
        v1_module(v1_root, num_classes=174).validate()


def test_train_split_smaller_than_a_batch(v1_root: Path) -> None:
    with pytest.raises(ValueError, match="less than one batch of batch_size=8"):
        v1_module(v1_root, batch_size=8).setup("fit")


# --------------------------------------------------------------------------- bad samples
def corrupt(v1_root: Path, video_id: str, frame: int) -> Path:
    path = v1_root / "20bn-something-something-v1" / video_id / f"{frame:05d}.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return path


def val_index(dm: SomethingSomethingDataModule, video_id: str) -> int:
    return next(i for i, r in enumerate(dm.val_set.records) if r.video_id == video_id)


@pytest.mark.parametrize("list_format", ["csv", "trn"])
def test_corrupt_jpg_fail(v1_root: Path, list_format: str) -> None:
    path = corrupt(v1_root, "2", 3)  # 16 frames, 4 segments: frames 3, 7, 11, 15 are read
    dm = v1_module(v1_root, list_format=list_format)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=re.escape(f"cannot decode frame {path}")):
        dm.val_set[val_index(dm, "2")]


def test_corrupt_jpg_fail_through_workers(v1_root: Path) -> None:
    path = corrupt(v1_root, "2", 3)
    dm = v1_module(v1_root, num_workers=1)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=re.escape(str(path))):
        list(dm.val_dataloader())


def test_corrupt_jpg_skip_is_counted_and_named(v1_root: Path) -> None:
    path = corrupt(v1_root, "2", 3)
    dm = v1_module(v1_root, bad_sample="skip")
    dm.setup("validate")
    with pytest.warns(BadSampleWarning, match=re.escape(str(path))):
        batches = list(dm.val_dataloader())
    assert [b["skipped"] for b in batches] == [1, 0]
    assert [b["video"].shape[0] for b in batches] == [1, 2]
    assert [b["index"].tolist() for b in batches] == [[1], [2, 3]]


def test_missing_frame(v1_root: Path) -> None:
    missing = v1_root / "20bn-something-something-v1" / "4" / "00004.jpg"  # 8 frames: 2, 4, 6, 8 read
    missing.unlink()
    dm = v1_module(v1_root)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=re.escape(f"missing frame: {missing}")):
        dm.val_set[val_index(dm, "4")]
    trn = v1_module(v1_root, list_format="trn", bad_sample="skip")  # trusts the listed 8 frames
    trn.setup("validate")
    with pytest.warns(BadSampleWarning, match=re.escape(f"missing frame: {missing}")):
        assert trn.val_set[val_index(trn, "4")] is None


def test_missing_frame_folder(v1_root: Path) -> None:
    folder = v1_root / "20bn-something-something-v1" / "6"
    for frame in folder.iterdir():
        frame.unlink()
    folder.rmdir()
    dm = v1_module(v1_root)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=re.escape(f"frame folder missing: {folder}")):
        dm.val_set[val_index(dm, "6")]


def test_all_skipped_batch_is_empty() -> None:
    batch = SkipNoneCollate((3, 4, 16, 16))([None, None])
    assert batch["video"].shape == (0, 3, 4, 16, 16)
    assert batch["label"].shape == batch["index"].shape == (0,)
    assert batch["skipped"] == 2


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["ssv1", "ssv2", "synthetic_ssv1"])
def test_hydra_configs_instantiate(tmp_path: Path, name: str) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / f"{name}.yaml")})
    dm = instantiate(cfg.data)
    assert isinstance(dm, SomethingSomethingDataModule)
    assert dm.root.parent == tmp_path
    if name == "ssv1":
        assert (dm.num_frames, dm.crop_size, dm.test_short_side, dm.batch_size) == (8, 224, 256, 12)
        assert dm.expected_num_classes == 174
        assert dm.train_scales == TSN_SCALES
    if name == "synthetic_ssv1":
        assert dm.num_classes == 4  # known before the data is generated (the demo set: two reversed pairs)
