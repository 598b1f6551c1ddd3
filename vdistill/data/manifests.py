"""Dataset registry: official annotation files -> video rows with ONE global class list (METHOD.md W-5, W-6).

Each adapter reads the dataset's own annotation format through Storage and returns a `Manifest`:
rows `(uri, label, split, start_s, end_s)` whose `label` indexes `classes`, a list shared by all splits.
Annotation rows whose video file is not found are returned in `missing` (reason "missing") so the
ingest reports them; they are never dropped silently (METHOD.md W-21). Split names are always
`data.train_split` / `data.test_split`; the official evaluation split (K400 `validate`, SSv2
`validation`, UCF/HMDB `test`) becomes the test split, and `carve_validation` holds a stratified share of the
training rows out as `data.val_split`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from vdistill.errors import UserError
from vdistill.storage import PATH_COMPONENT_RULE, is_path_component, join, location

# The 50 UCF101 classes of the paper's miniUCF (METHOD.md 1.1, from ucf50_splits1.csv).
MINIUCF_CLASSES = (
    "ApplyEyeMakeup", "BalanceBeam", "BandMarching", "BaseballPitch", "Basketball", "BasketballDunk", "Biking",
    "Billiards", "BlowingCandles", "Bowling", "BreastStroke", "CleanAndJerk", "CliffDiving", "CricketShot",
    "Diving", "FloorGymnastics", "FrisbeeCatch", "GolfSwing", "HammerThrow", "HighJump", "HorseRace",
    "HorseRiding", "HulaHoop", "IceDancing", "JumpingJack", "Knitting", "MilitaryParade", "Mixing",
    "ParallelBars", "PlayingPiano", "PlayingViolin", "PoleVault", "PommelHorse", "Punch", "Rafting", "Rowing",
    "SkateBoarding", "Skiing", "Skijet", "SkyDiving", "SoccerPenalty", "StillRings", "SumoWrestling", "Surfing",
    "Swing", "TennisSwing", "TrampolineJumping", "UnevenBars", "VolleyballSpiking", "WritingOnBoard",
)


@dataclass(frozen=True)
class VideoRow:
    """One clip to decode; `start_s`/`end_s` None = the whole file."""

    uri: str
    label: int
    split: str
    start_s: float | None = None
    end_s: float | None = None


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    rows: list[VideoRow]
    missing: list[dict] = field(default_factory=list)  # {"uri", "reason": "missing", "detail"}
    excluded: dict[str, int] = field(default_factory=dict)  # rows left out on purpose, by why
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each listed video: ingest GETs it without a HEAD


class _FileIndex:
    """One recursive listing of the video root, so existence checks cost no request per row."""

    def __init__(self, storage: Any, root: str) -> None:
        self.root = root.rstrip("/")
        self.sizes: dict[str, int] = storage.list_file_sizes(self.root)
        self.relative = {u[len(self.root) + 1:]: u for u in self.sizes}
        self.by_name: dict[str, str] = {}
        for rel, uri in sorted(self.relative.items()):
            self.by_name.setdefault(posixpath.basename(rel), uri)

    def find(self, candidates: list[str]) -> str | None:
        return next((self.relative[c] for c in candidates if c in self.relative), None)


def _annotations(data_cfg: Any) -> str:
    uri = data_cfg.annotations or data_cfg.root
    if not uri:
        raise ValueError("data.annotations (or data.root) must point at the dataset's annotation files")
    return uri


def _first_file(storage: Any, folder: str, names: list[str]) -> str:
    """The first of `names` (relative to folder) that exists; clear error listing what was tried."""
    for name in names:
        uri = join(folder, name)
        if storage.is_file(uri):
            return uri
    raise FileNotFoundError(f"none of {names} found under {folder}")


def _missing(where: str, detail: str) -> dict:
    return {"uri": where, "reason": "missing", "detail": detail}


def _index_rows(classes: list[str], items: list[tuple[str, str, str, float | None, float | None]]) -> list[VideoRow]:
    index = {c: i for i, c in enumerate(classes)}
    return [VideoRow(uri, index[label], split, t0, t1) for uri, label, split, t0, t1 in items]


# ---- Kinetics-400 ----------------------------------------------------------------------------------
def kinetics400(data_cfg: Any, storage: Any) -> Manifest:
    """train.csv -> train, validate.csv (or val.csv; else test.csv) -> test. Clips are pre-trimmed files.

    File `<youtube_id>_<start:06d>_<end:06d>.mp4` under `<root>/<k400_replacement>/` (also its nested
    `replacement_for_corrupted_k400/`, where the official replacement archive unpacks), else under
    `<root>/<split dir>/` (flat or per-label folder, label with spaces or underscores). A replacement wins:
    it has the same name as the corrupted original, which the download still has in its split folder.
    """
    ann = _annotations(data_cfg)
    files = _FileIndex(storage, data_cfg.root)
    sources = [("train", ["train.csv"], ["train"], data_cfg.train_split),
               ("validate", ["validate.csv", "val.csv", "test.csv"], ["validate", "val", "test"], data_cfg.test_split)]
    items, missing, labels, unlabelled = [], [], set(), 0
    repl = data_cfg.k400_replacement.strip("/")
    for _, csv_names, dirs, split in sources:
        text = storage.read_text(_first_file(storage, ann, csv_names))
        for rec in csv.DictReader(io.StringIO(text)):
            label = (rec.get("label") or "").strip()
            if not label:  # the official test.csv has no labels
                unlabelled += 1
                continue
            labels.add(label)
            name = f"{rec['youtube_id']}_{int(rec['time_start']):06d}_{int(rec['time_end']):06d}.mp4"
            cands = [f"{repl}/{name}", f"{repl}/replacement_for_corrupted_k400/{name}"]
            cands += [f"{d}/{sub}{name}" for d in dirs for sub in ("", f"{label}/", f"{label.replace(' ', '_')}/")]
            uri = files.find(cands)
            if uri is None:
                missing.append(_missing(join(data_cfg.root, dirs[0], name), f"K400 clip not found ({label})"))
            else:
                items.append((uri, label, split, None, None))
    classes = sorted(labels)
    excluded = {"unlabelled": unlabelled} if unlabelled else {}
    return Manifest("kinetics400", classes, _index_rows(classes, items), missing, excluded, files.sizes)


# ---- Something-Something V2 -------------------------------------------------------------------------
def ssv2(data_cfg: Any, storage: Any) -> Manifest:
    """labels.json (template -> index) + train/validation JSON lists; the class is the official index of
    the entry's template with `[` `]` removed, so `classes` is in official-index order. Files `<id>.webm`."""
    ann = _annotations(data_cfg)
    labels = storage.read_json(_first_file(storage, ann, ["something-something-v2-labels.json", "labels.json"]))
    classes = [name for name, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    files = _FileIndex(storage, data_cfg.root)
    items, missing = [], []
    for names, split in ((["something-something-v2-train.json", "train.json"], data_cfg.train_split),
                         (["something-something-v2-validation.json", "validation.json"], data_cfg.test_split)):
        for rec in storage.read_json(_first_file(storage, ann, names)):
            template = rec["template"].replace("[", "").replace("]", "")
            uri = files.by_name.get(f"{rec['id']}.webm")
            if uri is None:
                missing.append(_missing(join(data_cfg.root, f"{rec['id']}.webm"), f"SSv2 video {rec['id']}"))
            else:
                items.append((uri, template, split, None, None))
    return Manifest("ssv2", classes, _index_rows(classes, items), missing, sizes=files.sizes)


# ---- UCF101 / miniUCF -------------------------------------------------------------------------------
def _ucf_rows(data_cfg: Any, storage: Any, keep: set[str] | None) -> tuple[list[str], list, list, dict[str, int]]:
    ann = _annotations(data_cfg)
    prefixes = ["", "ucfTrainTestlist/"]
    class_ind = storage.read_text(_first_file(storage, ann, [f"{p}classInd.txt" for p in prefixes]))
    classes = sorted(line.split()[1] for line in class_ind.splitlines() if line.strip())
    if keep is not None:
        classes = [c for c in classes if c in keep]
    files = _FileIndex(storage, data_cfg.root)
    items, missing = [], []
    n = data_cfg.split_id
    for kind, split in (("train", data_cfg.train_split), ("test", data_cfg.test_split)):
        text = storage.read_text(_first_file(storage, ann, [f"{p}{kind}list{n:02d}.txt" for p in prefixes]))
        for line in text.splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            label = rel.split("/")[0]
            if label not in classes:
                continue
            uri = files.find([rel]) or files.by_name.get(posixpath.basename(rel))
            if uri is None:
                missing.append(_missing(join(data_cfg.root, rel), "UCF101 video not found"))
            else:
                items.append((uri, label, split, None, None))
    return classes, items, missing, files.sizes


def ucf101(data_cfg: Any, storage: Any) -> Manifest:
    """classInd.txt + trainlist0N/testlist0N (N = data.split_id), classes sorted by name like the paper."""
    classes, items, missing, sizes = _ucf_rows(data_cfg, storage, None)
    return Manifest("ucf101", classes, _index_rows(classes, items), missing, sizes=sizes)


def miniucf(data_cfg: Any, storage: Any) -> Manifest:
    """UCF101 restricted to the paper's 50 classes (MINIUCF_CLASSES)."""
    classes, items, missing, sizes = _ucf_rows(data_cfg, storage, set(MINIUCF_CLASSES))
    return Manifest("miniucf", classes, _index_rows(classes, items), missing, sizes=sizes)


# ---- HMDB51 ----------------------------------------------------------------------------------------
def hmdb51(data_cfg: Any, storage: Any) -> Manifest:
    """`<class>_test_split<N>.txt` lines `video.avi id`: 1 = train, 2 = test, 0 = unused.

    With `data.hmdb_unused_as_train` (default, the paper's choice: 5,236 train videos in split 1) the
    unused videos join train; otherwise they are left out and counted in `excluded["unused"]`.
    """
    ann = _annotations(data_cfg)
    pattern = re.compile(rf"^(.+)_test_split{data_cfg.split_id}\.txt$")
    split_files = {}
    for uri in storage.list_files(ann):
        m = pattern.match(posixpath.basename(uri))
        if m:
            split_files[m.group(1)] = uri
    if not split_files:
        raise FileNotFoundError(f"no <class>_test_split{data_cfg.split_id}.txt files under {ann}")
    classes = sorted(split_files)
    files = _FileIndex(storage, data_cfg.root)
    to_split = {"1": data_cfg.train_split, "2": data_cfg.test_split}
    if data_cfg.hmdb_unused_as_train:
        to_split["0"] = data_cfg.train_split
    items, missing, unused = [], [], 0
    for label in classes:
        for line in storage.read_text(split_files[label]).splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            name, code = parts[0], parts[1]
            if code not in to_split:
                unused += 1
                continue
            uri = files.find([f"{label}/{name}"]) or files.by_name.get(name)
            if uri is None:
                missing.append(_missing(join(data_cfg.root, label, name), "HMDB51 video not found"))
            else:
                items.append((uri, label, to_split[code], None, None))
    return Manifest("hmdb51", classes, _index_rows(classes, items), missing, {"unused": unused} if unused else {},
                    files.sizes)


# ---- generic CSV -----------------------------------------------------------------------------------
_TEST_NAMES = {"test", "val", "valid", "validate", "validation"}
CSV_COLUMNS = ("path", "label", "split", "start", "end")
CSV_FORMAT = "path,label[,split,start,end]"
_HEADER_NAMES = {  # a first row made only of these words is a header; it may order the columns freely
    "path": {"path", "filename", "file", "video", "video_path", "uri"},
    "label": {"label", "class", "class_name", "category"},
    "split": {"split", "subset"},
    "start": {"start", "start_s", "t0", "time_start"},
    "end": {"end", "end_s", "t1", "time_end"},
}
_DEFAULT_COLUMNS: dict[str, int | None] = {role: i for i, role in enumerate(CSV_COLUMNS)}
_MAX_REPORTED = 20


class AnnotationError(UserError, ValueError):
    """Bad rows in an annotation file, every one as `file:line: column n (name): what is wrong; what is allowed`."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        shown = problems[:_MAX_REPORTED]
        more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
        super().__init__(f"{len(problems)} problem(s) in annotation file {uri}; nothing was ingested:\n  "
                         + "\n  ".join(shown + more))
        self.uri, self.problems = uri, problems

    def __reduce__(self):  # crosses process boundaries (Ray) with its own arguments
        return AnnotationError, (self.uri, self.problems)


def _is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/")


def _sort_labels(labels: set[str]) -> list[str]:
    """Sorted names; all-integer labels sort numerically ("2" before "10")."""
    if labels and all(lbl.isdigit() for lbl in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _header_columns(cells: list[str]) -> dict[str, int] | None:
    """Column index per role when every cell is a known column name (a header row), else None."""
    roles: dict[str, int] = {}
    for i, cell in enumerate(cells):
        role = next((r for r, names in _HEADER_NAMES.items() if cell.strip().lower() in names), None)
        if role is None or role in roles:
            return None
        roles[role] = i
    return roles


def _seconds(cell: str) -> float | None:
    """A window bound: empty = none; else a finite number >= 0, or ValueError."""
    if not cell:
        return None
    value = float(cell)
    if not math.isfinite(value) or value < 0:
        raise ValueError(cell)
    return value


@dataclass(frozen=True)
class _CsvRow:
    line: int
    uri: str
    path: str
    label: str
    split: str
    start_s: float | None
    end_s: float | None


def _column(columns: dict[str, int | None], role: str) -> str:
    return f"column {(columns[role] or 0) + 1} ({role})"


def _parse_csv_row(cells: list[str], columns: dict[str, int | None], line: int, data_cfg: Any, root: str,
                   problems: list[str]) -> _CsvRow | None:
    """One data row, or None after appending its problems (`line: column n (name): what; allowed`)."""
    count = len(problems)
    if len(cells) > len(CSV_COLUMNS) and columns == _DEFAULT_COLUMNS:
        problems.append(f"{line}: {len(cells)} columns; rows are {CSV_FORMAT}")
        return None

    def cell(role: str) -> str:
        i = columns[role]
        return cells[i].strip() if i is not None and i < len(cells) else ""

    for role in ("path", "label"):
        i = columns[role] or 0
        if i >= len(cells):
            hint = next((f" (wrong delimiter {d!r}? use commas)" for d in ";\t|" if d in cells[0]), "")
            problems.append(f"{line}: {_column(columns, role)} is missing; rows are {CSV_FORMAT}{hint}")
        elif not cells[i].strip():
            problems.append(f"{line}: {_column(columns, role)} is empty; every row needs a video path and a class name")
    raw_split = cell("split").lower() or "train"
    split = data_cfg.test_split if raw_split in _TEST_NAMES else (
        data_cfg.train_split if raw_split == "train" else raw_split)
    if not is_path_component(split):
        problems.append(f"{line}: {_column(columns, 'split')}: {cell('split')!r} is not allowed; use train, test "
                        f"(or val, valid, validate, validation), or a name of {PATH_COMPONENT_RULE}")
    window = {}
    for role in ("start", "end"):
        try:
            window[role] = _seconds(cell(role))
        except ValueError:
            problems.append(f"{line}: {_column(columns, role)}: {cell(role)!r} is not a time in seconds; "
                            "allowed: empty (the whole video) or a finite number >= 0")
    t0, t1 = window.get("start"), window.get("end")
    if t0 is not None and t1 is not None and t1 <= t0:
        problems.append(f"{line}: {_column(columns, 'end')}: {t1} is not after start {t0}")
    if len(problems) > count:
        return None
    path = cell("path")
    uri = path if _is_absolute(path) else join(root, posixpath.normpath(path))
    return _CsvRow(line, uri, path, cell("label"), split, t0, t1)


def _conflicts(rows: list[_CsvRow], columns: dict[str, int | None], name: str) -> list[str]:
    """A file under two labels, or in two splits (a train/test leak): each reported at its later line. A file is
    its resolved location, so `a.mp4`, `./a.mp4`, `file://<root>/a.mp4` and a symlink to it are one file."""
    problems = []
    first: dict[str, _CsvRow] = {}
    for row in rows:
        where = location(row.uri)
        seen = first.setdefault(where, row)
        same = f"{row.path!r} is the file of {name}:{seen.line} ({seen.path!r}, {where})"
        if seen.label != row.label:
            problems.append(f"{row.line}: {_column(columns, 'label')}: {same}, listed as {seen.label!r} and "
                            f"{row.label!r}; a video has one label")
        if seen.split != row.split:
            problems.append(f"{row.line}: {_column(columns, 'split')}: {same}, listed in {seen.split!r} and "
                            f"{row.split!r} (a train/test leak); a video is in one split")
    return problems


_OUTSIDE_FIX = "move it under data.root, or set data.allow_outside_root=true to read files outside it"


def _escapes(root: str) -> Callable[[str], str | None]:
    """uri -> where it resolves (symlinks followed, `file://` stripped, s3 keys normalised) when that is outside
    `root`, else None: annotation files must not pull other local files or objects into the cache."""
    inside = location(root).rstrip("/") + "/"

    def outside(uri: str) -> str | None:
        where = location(uri)
        return None if where.startswith(inside) else where
    return outside


def generic_csv(data_cfg: Any, storage: Any) -> Manifest:
    """`path,label[,split,start,end]`, or any order under a header row (`filename,label,split`, ...); relative
    paths resolve against data.root (or the CSV's folder), and every file must resolve inside it unless
    data.allow_outside_root; split defaults to train; test/val/validate/validation
    map to the test split. Every row is checked first; all problems raise one AnnotationError."""
    csv_uri = _annotations(data_cfg)
    if not storage.is_file(csv_uri):
        raise FileNotFoundError(f"generic_csv: annotation CSV {csv_uri} not found (set data.annotations)")
    root = (data_cfg.root or csv_uri.rsplit("/", 1)[0]).rstrip("/")
    reader = csv.reader(io.StringIO(storage.read_text(csv_uri)))
    records = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    columns = dict(_DEFAULT_COLUMNS)
    problems: list[str] = []
    if records and (header := _header_columns(records[0][1])) is not None:
        line, _ = records.pop(0)
        for role in ("path", "label"):
            if role not in header:
                names = ", ".join(sorted(_HEADER_NAMES[role]))
                problems.append(f"{line}: header has no {role} column (one of {names})")
        used = set(header.values())  # columns the header leaves unnamed keep their default place
        columns = {role: header.get(role, None if i in used else i) for i, role in enumerate(CSV_COLUMNS)}
    rows = [] if problems else [
        r for line, cells in records if (r := _parse_csv_row(cells, columns, line, data_cfg, root, problems))]
    name = csv_uri.rsplit("/", 1)[-1]
    problems += _conflicts(rows, columns, name)
    if not data_cfg.allow_outside_root:
        escapes = _escapes(root)
        problems += [f"{row.line}: column 1 (path): {row.path!r} resolves to {where}, outside data.root {root}; "
                     f"{_OUTSIDE_FIX}" for row in rows if (where := escapes(row.uri))]
    if problems:
        raise AnnotationError(csv_uri, [f"{name}:{p}" for p in problems])
    files = _FileIndex(storage, root)
    items, missing = [], []
    for row in rows:
        rel = row.uri[len(root) + 1:]
        found = storage.is_file(row.uri) if _is_absolute(row.path) or rel.startswith("../") else rel in files.relative
        if found:
            items.append((row.uri, row.label, row.split, row.start_s, row.end_s))
        else:
            missing.append(_missing(row.uri, f"listed in {csv_uri}:{row.line} ({row.label})"))
    classes = _sort_labels({row.label for row in rows})
    return Manifest("generic_csv", classes, _index_rows(classes, items), missing, sizes=files.sizes)


ADAPTERS: dict[str, Callable[[Any, Any], Manifest]] = {
    "kinetics400": kinetics400, "ssv2": ssv2, "ucf101": ucf101, "miniucf": miniucf, "hmdb51": hmdb51,
    "generic_csv": generic_csv,
}


def build_manifest(data_cfg: Any, storage: Any) -> Manifest:
    """Rows for `data_cfg.dataset`, deduplicated and sorted by (split, label, uri) so shards stay per class."""
    try:
        adapter = ADAPTERS[data_cfg.dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {data_cfg.dataset!r}; known: {', '.join(sorted(ADAPTERS))}") from None
    manifest = adapter(data_cfg, storage)
    if data_cfg.dataset != "generic_csv" and not data_cfg.allow_outside_root:  # generic_csv names file:line itself
        escapes = _escapes(data_cfg.root)
        outside = [f"{row.uri} resolves to {where}, outside data.root {data_cfg.root}; {_OUTSIDE_FIX}"
                   for row in manifest.rows if (where := escapes(row.uri))]
        if outside:
            raise AnnotationError(_annotations(data_cfg), outside)
    unique = set(manifest.rows)  # a row listed twice would become two clips with one key
    if len(unique) < len(manifest.rows):
        manifest.excluded["duplicate"] = len(manifest.rows) - len(unique)
    manifest.rows = sorted(carve_validation(unique, data_cfg), key=lambda r: (r.split, r.label, r.uri, r.start_s or 0.0))
    return manifest


def carve_validation(rows: Iterable[VideoRow], data_cfg: Any) -> list[VideoRow]:
    """Move `data.val_fraction` of each class's training rows (at most `data.val_max_per_class`, never its last
    one) to `data.val_split`: the held-out clips on which a distillation stage picks its best iterate.

    Which rows move is a hash of each row's location and span, so the split is stratified, independent of the
    order the annotations list the rows, and the same at every re-run; the test split is never touched.
    """
    rows = list(rows)
    by_class: dict[int, list[VideoRow]] = {}
    for row in rows:
        if row.split == data_cfg.train_split:
            by_class.setdefault(row.label, []).append(row)
    held: set[VideoRow] = set()
    for members in by_class.values():
        k = min(data_cfg.val_max_per_class, len(members) - 1, round(len(members) * data_cfg.val_fraction))
        held.update(sorted(members, key=_row_digest)[:max(k, 0)])
    return [replace(r, split=data_cfg.val_split) if r in held else r for r in rows]


def _row_digest(row: VideoRow) -> str:
    return hashlib.sha256(f"{row.uri}|{row.start_s}|{row.end_s}".encode()).hexdigest()
