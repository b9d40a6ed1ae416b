"""Annotation formats users hold, parsed into ``Sample(path, label)`` lists with a label map, and the torch
Dataset that turns samples into clips (a clip that cannot be decoded is skipped and counted, never fatal).

Formats (``load_annotations`` detects them):
- ``list``: mmaction2-style lines ``path label`` (label an index or a class name); a ``labels.json`` beside the
  file names the classes. Labels and paths may hold spaces: the path ends with its video file extension
  (``my clip.mp4 riding a segway``), or a tab separates the two (``my clip<TAB>wave``); see
  :func:`split_list_line`.
- ``csv``: a header with ``path`` and ``label`` columns.
- ``k400``: Kinetics CSVs (``label,youtube_id,time_start,time_end,split[,is_cc]``); clips are
  ``{root}/{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` (label folder as written or with
  underscores) or the same name flat under root.
- ``ssv2``: Something-Something-v2 (``*labels.json`` name -> index; ``*train.json`` / ``*validation.json`` with
  ``id`` and ``template``; clips ``{root}/{id}.webm``).
- ``ucf101``: ``classInd.txt`` with ``trainlist0N.txt`` / ``testlist0N.txt``; clips ``{root}/{Class}/{file}``.
- ``hmdb51``: ``{class}_test_split{N}.txt`` files (1 = train, 2 = test); clips ``{root}/{class}/{file}``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from stadapter.config import TaskSpec
from stadapter.errors import ConfigError, DecodeError, StadapterError
from stadapter.video.decode import decode_frames, probe
from stadapter.video.sampling import sample_indices
from stadapter.video.transforms import test_views, train_clip

log = logging.getLogger(__name__)

FORMATS = ("list", "csv", "k400", "ssv2", "ucf101", "hmdb51")


class AnnotationError(StadapterError, ValueError):
    """An annotation file that is missing, malformed, or names unknown classes."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


class Annotations(NamedTuple):
    samples: list[Sample]
    classes: list[str]  # the label map: class name of each index


# ----------------------------------------------------------------------------------------------- label map

def save_labels(classes: Sequence[str], path: str | Path) -> Path:
    """Write the label map as labels.json: a JSON list of class names in index order."""
    p = Path(path)
    p.write_text(json.dumps(list(classes), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def load_labels(path: str | Path) -> list[str]:
    """Read a label map: a JSON list of names, or an object mapping name -> index (as SSv2's labels file)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AnnotationError(f"{p}: cannot read the label map ({e})") from e
    if isinstance(data, dict):
        try:
            pairs = sorted((int(i), str(name)) for name, i in data.items())
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{p}: a label map object must map class names to integer indices") from e
        if [i for i, _ in pairs] != list(range(len(pairs))):
            raise AnnotationError(f"{p}: label indices must be 0..{len(pairs) - 1} without gaps")
        return [name for _, name in pairs]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise AnnotationError(f"{p}: a label map must be a JSON list of class names")
    if len(set(data)) != len(data):
        raise AnnotationError(f"{p}: class names repeat")
    return list(data)


def check_num_classes(classes: Sequence[str], num_classes: int) -> None:
    """Raise ConfigError when the label map and the classifier head disagree in size."""
    if len(classes) != num_classes:
        raise ConfigError(f"the label map has {len(classes)} classes but the head has {num_classes} outputs; "
                          f"set num_classes to {len(classes)} or use the matching labels")


class _Labels:
    """Maps raw label strings to indices: through a fixed class list, or derived from what the file holds."""

    def __init__(self, classes: Sequence[str] | None) -> None:
        self.fixed = list(classes) if classes is not None else None
        self.index = {c: i for i, c in enumerate(self.fixed or [])}

    def resolve(self, raw: list[str], where: list[str]) -> tuple[list[int], list[str]]:
        if self.fixed is not None:
            out = []
            for r, w in zip(raw, where, strict=True):
                if r in self.index:
                    out.append(self.index[r])
                elif r.isdigit() and int(r) < len(self.fixed):
                    out.append(int(r))
                else:
                    raise AnnotationError(f"{w}: label {r!r} is not one of the {len(self.fixed)} known classes")
            return out, self.fixed
        if raw and all(r.isdigit() for r in raw):
            labels = [int(r) for r in raw]
            return labels, [str(i) for i in range(max(labels) + 1)]
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        return [index[r] for r in raw], classes


def _resolve(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")  # a BOM is not part of the first line
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror or e})") from e
    # tabs kept at the ends: 'my clip.mp4<TAB>' is a path with no label, not the path 'my' (split_list_line)
    return [(n, ln.strip(" ")) for n, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.startswith("#")]


# ---------------------------------------------------------------------------------------------- formats

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                  ".ogv", ".ts")


def split_list_line(line: str, where: str) -> tuple[str, str]:
    """(path, label) of one list-file line.

    With a tab, the path is what comes before the first tab and the label what comes after. Without one, the
    path runs through the last whitespace-separated word that ends in a video file extension (VIDEO_SUFFIXES; so
    ``my clip.mp4 riding a segway`` is the path ``my clip.mp4`` and the label ``riding a segway``), or is the
    first word of a two-word line when none does; the label is the rest. Runs of blanks in a label count as one
    space. AnnotationError naming ``where`` (FILE:LINE) for a line with no label (or whose last word ends in a
    video file extension: ``my clip.mp4``), with a second tab, or of more than two words none of which (before
    the last) ends in a video file extension (ambiguous: a tab is needed)."""
    if "\t" in line:
        path, _, label = (part.strip() for part in line.partition("\t"))
        if "\t" in label:
            raise AnnotationError(f"{where}: expected 'path<TAB>label' with one tab, got {line!r}")
    else:
        words = line.split()
        ends = [i for i, w in enumerate(words[:-1]) if w.lower().endswith(VIDEO_SUFFIXES)]
        if words[-1].lower().endswith(VIDEO_SUFFIXES):  # 'my clip.mp4': a path with a space and no label
            raise AnnotationError(f"{where}: expected 'path label' (or 'path<TAB>label'), got {line!r}: it ends "
                                  f"with a video file name, not a label")
        if not ends and len(words) > 2:  # 'my clip 3' or 'clip.mts riding a segway': no guess, a clear error
            raise AnnotationError(f"{where}: cannot tell the path from the label in {line!r} (no word ends in a "
                                  f"video file extension such as .mp4); separate them with a tab")
        cut = ends[-1] + 1 if ends else 1
        path = line[:_word_end(line, cut)].strip()
        label = " ".join(words[cut:])
    label = " ".join(label.split())
    if not path or not label:
        raise AnnotationError(f"{where}: expected 'path label' (or 'path<TAB>label'), got {line!r}")
    return path, label


def _word_end(line: str, n: int) -> int:
    """The index in ``line`` just after its ``n``-th whitespace-separated word (n >= 1)."""
    return [m.end() for m in re.finditer(r"\S+", line)][n - 1]


def parse_list(path: Path, root: Path | None = None, classes: Sequence[str] | None = None) -> Annotations:
    """``path label`` lines: the label is everything after the path (:func:`split_list_line`)."""
    root = root or path.parent
    if classes is None and (path.parent / "labels.json").is_file():
        classes = load_labels(path.parent / "labels.json")
    paths, raw, where = [], [], []
    for n, line in _lines(path):
        clip, label = split_list_line(line, f"{path}:{n}")
        paths.append(clip)
        raw.append(label)
        where.append(f"{path}:{n}")
    labels, names = _Labels(classes).resolve(raw, where)
    return Annotations([Sample(_resolve(root, p), y) for p, y in zip(paths, labels, strict=True)], names)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM is not part of the first column
            return [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read as CSV ({e})") from e


def parse_csv(path: Path, root: Path | None = None, classes: Sequence[str] | None = None) -> Annotations:
    """A CSV with a header holding ``path`` (or video / filename) and ``label`` (or class) columns."""
    root = root or path.parent
    rows = _read_csv(path)
    keys = set(rows[0]) if rows else set()
    pcol = next((k for k in ("path", "video", "filename", "file") if k in keys), None)
    lcol = next((k for k in ("label", "class", "label_name") if k in keys), None)
    if pcol is None or lcol is None:
        raise AnnotationError(f"{path}: a CSV needs a header with 'path' and 'label' columns, found {sorted(keys)}")
    where = [f"{path}:{i + 2}" for i in range(len(rows))]
    labels, names = _Labels(classes).resolve([r[lcol] for r in rows], where)
    return Annotations([Sample(_resolve(root, r[pcol]), y) for r, y in zip(rows, labels, strict=True)], names)


def k400_filename(youtube_id: str, time_start: int, time_end: int, ext: str = ".mp4") -> str:
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}{ext}"


def parse_k400(path: Path, root: Path | None = None, classes: Sequence[str] | None = None) -> Annotations:
    """A Kinetics CSV; each clip is found under root in a label folder (as written, or with underscores) or
    flat. Clips found nowhere keep the label-folder path (the dataset skips and counts them)."""
    root = root or path.parent
    rows = _read_csv(path)
    need = {"label", "youtube_id", "time_start", "time_end"}
    if not rows or not need <= set(rows[0]):
        raise AnnotationError(f"{path}: a Kinetics CSV needs columns {sorted(need)} (a test split without "
                              "labels cannot be used for training or evaluation)")
    files, missing = [], 0
    for i, r in enumerate(rows):
        try:
            name = k400_filename(r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"])))
        except ValueError as e:
            raise AnnotationError(f"{path}:{i + 2}: bad time_start/time_end ({e})") from e
        candidates = [root / r["label"] / name, root / r["label"].replace(" ", "_") / name, root / name]
        found = next((c for c in candidates if c.is_file()), None)
        missing += found is None
        files.append(found or candidates[0])
    if missing:
        log.warning("%s: %d of %d clips are not under %s; they will be skipped", path, missing, len(rows), root)
    where = [f"{path}:{i + 2}" for i in range(len(rows))]
    labels, names = _Labels(classes).resolve([r["label"] for r in rows], where)
    return Annotations([Sample(f, y) for f, y in zip(files, labels, strict=True)], names)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AnnotationError(f"{path}: cannot read as JSON ({e})") from e


def parse_ssv2(path: Path, root: Path | None = None, split: str = "train") -> Annotations:
    """Something-Something-v2: a folder with the labels / train / validation JSON files, or one list file
    (then the labels file is looked for beside it). Labels are the templates without brackets."""
    folder = path if path.is_dir() else path.parent
    labels_files = sorted(f for f in folder.glob("*.json") if f.stem.endswith("labels"))
    if not labels_files:
        raise AnnotationError(f"{folder}: no SSv2 labels file (*labels.json) found")
    if path.is_dir():
        key = {"train": "train", "val": "validation", "test": "test"}[_split_kind(split)]
        lists = sorted(f for f in folder.glob("*.json") if f.stem.endswith(key))
        if not lists:
            raise AnnotationError(f"{folder}: no SSv2 list for split {split!r} (*{key}.json)")
        path = lists[0]
    classes = load_labels(labels_files[0])
    index = {c: i for i, c in enumerate(classes)}
    root = root or folder
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: an SSv2 list must be a JSON list of objects")
    samples = []
    for e in entries:
        if not isinstance(e, dict) or "id" not in e or "template" not in e:
            raise AnnotationError(f"{path}: every entry needs 'id' and 'template' (a test list has no labels)")
        name = e["template"].replace("[", "").replace("]", "")
        if name not in index:
            raise AnnotationError(f"{path}: template {name!r} (id {e['id']}) is not in {labels_files[0].name}")
        samples.append(Sample(root / f"{e['id']}.webm", index[name]))
    return Annotations(samples, classes)


def parse_ucf101(path: Path, root: Path | None = None, split: str = "train", fold: int = 1) -> Annotations:
    """UCF101: classInd.txt (1-based) with trainlist0N.txt (``Class/file.avi label``) or testlist0N.txt."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and re.fullmatch(r"(train|test)list\d+\.txt", path.name):
        listfile = path
    else:
        kind = "train" if _split_kind(split) == "train" else "test"
        listfile = folder / f"{kind}list{fold:02d}.txt"
    ind = folder / "classInd.txt"
    if not ind.is_file() or not listfile.is_file():
        raise AnnotationError(f"{folder}: UCF101 needs classInd.txt and {listfile.name}")
    pairs = []
    for n, line in _lines(ind):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AnnotationError(f"{ind}:{n}: expected 'index ClassName', got {line!r}")
        pairs.append((int(parts[0]), parts[1]))
    classes = [name for _, name in sorted(pairs)]
    lower = {c.lower(): i for i, c in enumerate(classes)}
    root = root or folder
    samples = []
    for n, line in _lines(listfile):
        parts = line.split()
        rel = parts[0]
        if len(parts) > 1:
            label = int(parts[1]) - 1
        else:
            label = lower.get(rel.replace("\\", "/").split("/")[0].lower(), -1)
        if not 0 <= label < len(classes):
            raise AnnotationError(f"{listfile}:{n}: cannot tell the class of {line!r}")
        samples.append(Sample(root / rel, label))
    return Annotations(samples, classes)


def parse_hmdb51(path: Path, root: Path | None = None, split: str = "train", fold: int = 1) -> Annotations:
    """HMDB51: one ``{class}_test_split{fold}.txt`` per class with ``file.avi 0|1|2`` lines (1 train, 2 test)."""
    folder = path if path.is_dir() else path.parent
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(suffix))
    if not files:
        raise AnnotationError(f"{folder}: no HMDB51 split files (*{suffix})")
    classes = [f.name[: -len(suffix)] for f in files]
    want = "1" if _split_kind(split) == "train" else "2"
    root = root or folder
    samples = []
    for label, (name, f) in enumerate(zip(classes, files, strict=True)):
        for n, line in _lines(f):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(f"{f}:{n}: expected 'file.avi 0|1|2', got {line!r}")
            if parts[1] == want:
                samples.append(Sample(root / name / parts[0], label))
    return Annotations(samples, classes)


def _split_kind(split: str) -> str:
    s = split.lower()
    if s in ("train", "training"):
        return "train"
    if s in ("val", "valid", "validate", "validation"):
        return "val"
    if s == "test":
        return "test"
    raise AnnotationError(f"unknown split {split!r}; use train, val or test")


def detect_format(path: str | Path) -> str:
    """The annotation format of a file or folder, from its names and (for CSV) its header."""
    p = Path(path)
    if not p.exists():
        raise AnnotationError(f"{p}: no such annotation file or folder")
    if p.is_dir():
        names = [c.name for c in p.iterdir()]
        if "classInd.txt" in names:
            return "ucf101"
        if any(re.search(r"_test_split\d+\.txt$", n) for n in names):
            return "hmdb51"
        if any(n.endswith("labels.json") for n in names) and any(n.endswith(("train.json", "validation.json"))
                                                                 for n in names):
            return "ssv2"
        if any(n.endswith(".csv") and "youtube_id" in _header(p / n) for n in names):
            return "k400"
        raise AnnotationError(f"{p}: cannot tell the annotation format of this folder (looked for UCF101 "
                              "classInd.txt, HMDB51 *_test_split1.txt, SSv2 *labels.json, Kinetics CSVs)")
    if p.name == "classInd.txt" or re.fullmatch(r"(train|test)list\d+\.txt", p.name):
        return "ucf101"
    if re.search(r"_test_split\d+\.txt$", p.name):
        return "hmdb51"
    if p.suffix.lower() == ".json":
        return "ssv2"
    if p.suffix.lower() == ".csv":
        return "k400" if "youtube_id" in _header(p) else "csv"
    return "list"


def _header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return [h.strip().lower() for h in f.readline().split(",")]
    except OSError:
        return []


def _k400_csv(folder: Path, split: str) -> Path:
    names = {"train": ["train.csv"], "val": ["validate.csv", "val.csv", "validation.csv"], "test": ["test.csv"]}
    for n in names[_split_kind(split)]:
        if (folder / n).is_file():
            return folder / n
    raise AnnotationError(f"{folder}: no Kinetics CSV for split {split!r} (looked for {names[_split_kind(split)]})")


def load_annotations(path: str | Path, fmt: str = "auto", split: str = "train", root: str | Path | None = None,
                     classes: Sequence[str] | None = None, fold: int = 1) -> Annotations:
    """Parse annotations into (samples, classes). ``split`` picks the list inside a dataset folder (train,
    val, test); ``fold`` the UCF101/HMDB51 split number; ``root`` where clips live (default: beside the
    annotations); ``classes`` a fixed label map (list, csv and k400 formats), e.g. the training set's."""
    p = Path(path)
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise AnnotationError(f"unknown annotation format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    if not p.exists():
        raise AnnotationError(f"{p}: no such annotation file or folder")
    r = Path(root) if root is not None else None
    if fmt in ("list", "csv") and p.is_dir():
        raise AnnotationError(f"{p}: the {fmt} format needs a file, not a folder")
    if fmt == "list":
        ann = parse_list(p, r, classes)
    elif fmt == "csv":
        ann = parse_csv(p, r, classes)
    elif fmt == "k400":
        ann = parse_k400(_k400_csv(p, split) if p.is_dir() else p, r, classes)
    elif fmt == "ssv2":
        ann = parse_ssv2(p, r, split)
    elif fmt == "ucf101":
        ann = parse_ucf101(p, r, split, fold)
    else:
        ann = parse_hmdb51(p, r, split, fold)
    if not ann.samples:
        raise AnnotationError(f"{p}: no clips listed for split {split!r}")
    return ann


# ---------------------------------------------------------------------------------------------- dataset

@dataclass(frozen=True)
class Skipped:
    """What a dataset item is when its clip cannot be decoded (falsy, like None)."""

    path: Path | None
    reason: str

    def __bool__(self) -> bool:
        return False


class Batch(NamedTuple):
    clips: torch.Tensor | None  # (B, T, 3, S, S) in training, (B, V, T, 3, S, S) at test; None if all skipped
    labels: torch.Tensor | None  # (B,) int64
    skipped: list[Skipped]


def collate_skip(batch: Sequence[Any]) -> Batch:
    """Stack the decodable items of a batch; skipped ones (Skipped or None) are reported, not stacked."""
    kept = [b for b in batch if b is not None and not isinstance(b, Skipped)]
    skipped = [b if isinstance(b, Skipped) else Skipped(None, "item was None") for b in batch
               if b is None or isinstance(b, Skipped)]
    if not kept:
        return Batch(None, None, skipped)
    clips = torch.stack([b[0] for b in kept])
    labels = torch.tensor([int(b[1]) for b in kept], dtype=torch.long)
    return Batch(clips, labels, skipped)


class VideoClipDataset(Dataset):
    """Samples -> ``(clip (T, 3, S, S), label)`` in training, ``(views (V, T, 3, S, S), label)`` at test
    (V = temporal x spatial views). A clip that cannot be decoded gives a ``Skipped`` item (its path logged);
    use ``collate_skip`` and a ``SkipCounter``. Randomness is a function of (seed, epoch, index), so a resumed
    run sees the same clips: call ``set_epoch`` before each epoch (with DataLoader workers, keep
    ``persistent_workers`` off so they see the new epoch)."""

    def __init__(self, samples: Sequence[Sample], spec: TaskSpec, size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, seed: int = 0,
                 frame_cache: dict[int, np.ndarray] | None = None) -> None:
        self.samples = list(samples)
        self.spec, self.size, self.train, self.seed = spec, int(size), bool(train), int(seed)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.epoch = 0
        self._lengths: dict[int, int] = {}
        self.frame_cache = frame_cache  # index -> every decoded frame (N, H, W, 3); shared across epochs

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """The item without the skip guard: raises DecodeError for a bad clip."""
        sample = self.samples[index]
        rng = self.rng(index)
        if self.frame_cache is not None:
            if index not in self.frame_cache:
                n = probe(sample.path).num_frames
                self.frame_cache[index] = decode_frames(sample.path, np.arange(n))  # (N, H, W, 3)
            every = self.frame_cache[index]
            stacks = every[sample_indices(len(every), self.spec, self.train, rng)]  # (V_t, T, H, W, 3)
        else:
            if index not in self._lengths:
                self._lengths[index] = probe(sample.path).num_frames
            idx = sample_indices(self._lengths[index], self.spec, self.train, rng)  # (V_t, T)
            unique = np.unique(idx)
            frames = decode_frames(sample.path, unique)  # (U, H, W, 3)
            stacks = frames[np.searchsorted(unique, idx)]  # (V_t, T, H, W, 3)
        if self.train:
            return train_clip(stacks[0], self.spec, self.size, self.mean, self.std, rng), sample.label
        return test_views(stacks, self.spec, self.size, self.mean, self.std), sample.label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Skipped:
        try:
            return self.load(index)
        except DecodeError as e:
            log.warning("skipping clip %s: %s", self.samples[index].path, e)
            return Skipped(self.samples[index].path, str(e))


class SkipCounter:
    """Counts skipped clips over a run: warns once per file, and raises StadapterError naming examples when
    more than ``max_fraction`` of the clips tried (after ``min_attempts``) could not be decoded."""

    def __init__(self, max_fraction: float = 0.5, min_attempts: int = 8,
                 warn: Callable[[str], None] | None = None) -> None:
        self.max_fraction, self.min_attempts = max_fraction, min_attempts
        self.warn = warn or log.warning
        self.attempts = 0
        self.skipped = 0
        self.reasons: dict[str, str] = {}  # first reason per file

    def update(self, batch: Batch | None = None, ok: int | None = None,
               skipped: Sequence[Skipped] = ()) -> None:
        """Count one batch (or ``ok`` good clips and ``skipped`` items); may raise StadapterError."""
        if batch is not None:
            ok = 0 if batch.labels is None else len(batch.labels)
            skipped = batch.skipped
        self.attempts += (ok or 0) + len(skipped)
        for s in skipped:
            self.skipped += 1
            key = str(s.path)
            if key not in self.reasons:
                self.reasons[key] = s.reason
                self.warn(f"skipped a clip that cannot be decoded: {s.reason}")
        self.check()

    def check(self) -> None:
        if self.attempts >= self.min_attempts and self.skipped > self.max_fraction * self.attempts:
            examples = "; ".join(list(self.reasons.values())[:3])
            raise StadapterError(f"{self.skipped} of {self.attempts} clips could not be decoded, so the dataset "
                                 f"paths or files are likely wrong (e.g. {examples})")

    @property
    def files(self) -> list[str]:
        return list(self.reasons)

    def summary(self) -> str:
        return f"skipped {self.skipped} of {self.attempts} clips ({len(self.reasons)} files)"


__all__ = ["FORMATS", "AnnotationError", "Sample", "Annotations", "save_labels", "load_labels",
           "check_num_classes", "parse_list", "parse_csv", "parse_k400", "parse_ssv2", "parse_ucf101",
           "parse_hmdb51", "k400_filename", "detect_format", "load_annotations", "Skipped", "Batch",
           "collate_skip", "VideoClipDataset", "SkipCounter"]
