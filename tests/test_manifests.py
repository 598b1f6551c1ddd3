"""Dataset adapters on small annotation files in the official formats (files are placeholders: only existence counts)."""
from __future__ import annotations

import json

import pytest

from vdistill.config import DataConfig
from vdistill.data.manifests import MINIUCF_CLASSES, AnnotationError, build_manifest
from vdistill.storage import Storage, join


def _touch(storage: Storage, root: str, *paths: str) -> None:
    for p in paths:
        storage.write_bytes(join(root, p), b"x")


def _data(tmp_path, dataset: str, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(tmp_path / "videos"), annotations=str(tmp_path / "ann"), **kw)


def _by_split(manifest) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list] = {}
    for r in manifest.rows:
        out.setdefault(r.split, []).append((r.uri.rsplit("/", 1)[1], manifest.classes[r.label]))
    return out


K400_HEADER = "label,youtube_id,time_start,time_end,split\n"


@pytest.fixture
def k400(tmp_path):
    storage = Storage()
    ann = str(tmp_path / "ann")
    storage.write_text(join(ann, "train.csv"), K400_HEADER + "abseiling,aaa,0,10,train\n"
                       "air drumming,bbb,5,15,train\nzumba,ccc,12,22,train\n")
    storage.write_text(join(ann, "validate.csv"), K400_HEADER + "zumba,ddd,1,11,validate\n"
                       "abseiling,eee,0,10,validate\n")
    _touch(storage, str(tmp_path / "videos"), "train/aaa_000000_000010.mp4",
           "train/air_drumming/bbb_000005_000015.mp4", "replacement/ccc_000012_000022.mp4",
           "val/ddd_000001_000011.mp4")
    return build_manifest(_data(tmp_path, "kinetics400"), storage)


def test_k400_finds_flat_labelled_and_replacement_files(k400):
    assert sorted(_by_split(k400)["train"]) == [("aaa_000000_000010.mp4", "abseiling"),
                                                 ("bbb_000005_000015.mp4", "air drumming"),
                                                 ("ccc_000012_000022.mp4", "zumba")]


def test_k400_validate_becomes_test_and_missing_is_reported(k400):
    assert _by_split(k400)["test"] == [("ddd_000001_000011.mp4", "zumba")]
    assert [m["reason"] for m in k400.missing] == ["missing"]
    assert "eee_000000_000010.mp4" in k400.missing[0]["uri"]


def test_k400_class_list_is_global_and_sorted(k400):
    assert k400.classes == ["abseiling", "air drumming", "zumba"]


def test_ssv2_labels_by_template_without_brackets(tmp_path):
    storage = Storage()
    ann = str(tmp_path / "ann")
    storage.write_json(join(ann, "labels.json"), {"Approaching something with your camera": "0",
                                                  "Holding something next to something": "1",
                                                  "Pushing something from left to right": "2"})
    storage.write_text(join(ann, "train.json"), json.dumps([
        {"id": "11", "label": "holding a cup next to a pen", "template": "Holding [something] next to [something]",
         "placeholders": ["a cup", "a pen"]},
        {"id": "12", "label": "pushing a box from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a box"]}]))
    storage.write_text(join(ann, "validation.json"), json.dumps([
        {"id": "13", "label": "approaching a tree with your camera",
         "template": "Approaching [something] with your camera", "placeholders": ["a tree"]},
        {"id": "14", "label": "x", "template": "Approaching [something] with your camera", "placeholders": []}]))
    _touch(storage, str(tmp_path / "videos"), "11.webm", "12.webm", "13.webm")
    m = build_manifest(_data(tmp_path, "ssv2"), storage)
    assert [(r.uri.rsplit("/", 1)[1], r.label, r.split) for r in m.rows] == [
        ("13.webm", 0, "test"), ("11.webm", 1, "train"), ("12.webm", 2, "train")]
    assert len(m.missing) == 1 and m.missing[0]["uri"].endswith("14.webm")


def _ucf(tmp_path, classes: list[str]) -> Storage:
    storage = Storage()
    ann = str(tmp_path / "ann" / "ucfTrainTestlist")
    storage.write_text(join(ann, "classInd.txt"), "".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    for n in (1, 2):
        train = "".join(f"{c}/v_{c}_g{10 + n:02d}_c01.avi {i + 1}\n" for i, c in enumerate(classes))
        test = "".join(f"{c}/v_{c}_g{n:02d}_c01.avi\n" for c in classes)
        storage.write_text(join(ann, f"trainlist{n:02d}.txt"), train)
        storage.write_text(join(ann, f"testlist{n:02d}.txt"), test)
        _touch(storage, str(tmp_path / "videos"),
               *[f"{c}/v_{c}_g{10 + n:02d}_c01.avi" for c in classes], *[f"{c}/v_{c}_g{n:02d}_c01.avi" for c in classes])
    return storage


def test_ucf101_uses_requested_split_files(tmp_path):
    storage = _ucf(tmp_path, ["Archery", "ApplyEyeMakeup", "YoYo"])
    m = build_manifest(_data(tmp_path, "ucf101", split_id=2), storage)
    assert m.classes == ["ApplyEyeMakeup", "Archery", "YoYo"]
    assert sorted(_by_split(m)["train"]) == [(f"v_{c}_g12_c01.avi", c) for c in m.classes]
    assert sorted(_by_split(m)["test"]) == [(f"v_{c}_g02_c01.avi", c) for c in m.classes]


def test_miniucf_keeps_only_the_paper_classes(tmp_path):
    storage = _ucf(tmp_path, ["ApplyEyeMakeup", "Archery", "Biking", "YoYo"])
    m = build_manifest(_data(tmp_path, "miniucf"), storage)
    assert len(MINIUCF_CLASSES) == 50
    assert m.classes == ["ApplyEyeMakeup", "Biking"]
    assert {c for _, c in _by_split(m)["test"]} == {"ApplyEyeMakeup", "Biking"}


@pytest.fixture
def hmdb(tmp_path):
    storage = Storage()
    ann = str(tmp_path / "ann")
    for c in ("brush_hair", "wave"):
        storage.write_text(join(ann, f"{c}_test_split1.txt"), f"{c}_a.avi 1 \n{c}_b.avi 2 \n{c}_c.avi 0 \n")
        storage.write_text(join(ann, f"{c}_test_split2.txt"), f"{c}_a.avi 2 \n{c}_b.avi 1 \n{c}_c.avi 1 \n")
        _touch(storage, str(tmp_path / "videos"), f"{c}/{c}_a.avi", f"{c}/{c}_b.avi", f"{c}/{c}_c.avi")
    return storage


def test_hmdb_unused_videos_join_train_by_default(tmp_path, hmdb):
    m = build_manifest(_data(tmp_path, "hmdb51"), hmdb)
    assert sorted(n for n, _ in _by_split(m)["train"]) == ["brush_hair_a.avi", "brush_hair_c.avi", "wave_a.avi",
                                                            "wave_c.avi"]
    assert sorted(n for n, _ in _by_split(m)["test"]) == ["brush_hair_b.avi", "wave_b.avi"]


def test_hmdb_unused_videos_excluded_and_counted_when_off(tmp_path, hmdb):
    m = build_manifest(_data(tmp_path, "hmdb51", hmdb_unused_as_train=False), hmdb)
    assert len(_by_split(m)["train"]) == 2 and m.excluded == {"unused": 2}


def test_hmdb_reads_requested_split(tmp_path, hmdb):
    m = build_manifest(_data(tmp_path, "hmdb51", split_id=2), hmdb)
    assert sorted(n for n, _ in _by_split(m)["test"]) == ["brush_hair_a.avi", "wave_a.avi"]


def test_generic_csv_resolves_paths_splits_and_windows(tmp_path):
    storage = Storage()
    root = str(tmp_path / "videos")
    _touch(storage, root, "a/1.mp4", "b/2.mp4", "b/3.mp4")
    csv_uri = str(tmp_path / "ann.csv")
    storage.write_text(csv_uri, "path,label,split,start,end\na/1.mp4,10,,,\nb/2.mp4,2,val,1.5,3\n"
                                "b/3.mp4,2,train,,\nb/gone.mp4,7,test,,\n")
    m = build_manifest(DataConfig(dataset="generic_csv", root=root, annotations=csv_uri), storage)
    assert m.classes == ["2", "7", "10"]  # numeric labels sort numerically; a missing row's class still counts
    got = [(r.uri.rsplit("/", 1)[1], m.classes[r.label], r.split, r.start_s, r.end_s) for r in m.rows]
    assert got == [("2.mp4", "2", "test", 1.5, 3.0), ("3.mp4", "2", "train", None, None),
                   ("1.mp4", "10", "train", None, None)]
    assert [(x["reason"], x["uri"].rsplit("/", 1)[1]) for x in m.missing] == [("missing", "gone.mp4")]


def test_unknown_dataset_names_the_known_ones(tmp_path):
    cfg = DataConfig.model_construct(dataset="imagenet", root="", annotations="x")
    with pytest.raises(ValueError, match="generic_csv"):
        build_manifest(cfg, Storage())


def test_generic_csv_duplicate_rows_are_counted_once(tmp_path):
    storage = Storage()
    root = str(tmp_path / "videos")
    _touch(storage, root, "a.mp4")
    csv_uri = str(tmp_path / "ann.csv")
    storage.write_text(csv_uri, "a.mp4,x\na.mp4,x\n")
    m = build_manifest(DataConfig(dataset="generic_csv", root=root, annotations=csv_uri), storage)
    assert len(m.rows) == 1 and m.excluded == {"duplicate": 1}


# ---- generic CSV: every bad row named by file:line and column, before anything is written ------------------
def _generic(tmp_path, text: str):
    storage = Storage()
    root = str(tmp_path / "videos")
    _touch(storage, root, "a.mp4", "b.mp4", "c.mp4")
    csv_uri = str(tmp_path / "ann.csv")
    storage.write_text(csv_uri, text)
    return DataConfig(dataset="generic_csv", root=root, annotations=csv_uri), storage


def _problems(tmp_path, text: str) -> str:
    data, storage = _generic(tmp_path, text)
    with pytest.raises(AnnotationError) as info:
        build_manifest(data, storage)
    return str(info.value)


def test_split_that_would_escape_the_cache_is_rejected_with_file_line(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat,train\nb.mp4,cat,x/../../escaped_split\n")
    assert "ann.csv:2: column 3 (split): 'x/../../escaped_split' is not allowed" in text
    assert "letters, digits" in text


def test_csv_without_label_column_names_the_row_and_the_format(tmp_path):
    text = _problems(tmp_path, "a.mp4\nb.mp4\n")
    assert "ann.csv:1: column 2 (label) is missing; rows are path,label[,split,start,end]" in text
    assert "ann.csv:2:" in text


def test_semicolon_delimited_csv_is_reported_as_a_wrong_delimiter(tmp_path):
    text = _problems(tmp_path, "a.mp4;cat;train\n")
    assert "ann.csv:1: column 2 (label) is missing" in text and "wrong delimiter ';'" in text


def test_non_finite_start_is_rejected(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat,train,inf,\n")
    assert "ann.csv:1: column 4 (start): 'inf' is not a time in seconds; allowed: empty" in text


def test_non_numeric_start_is_rejected(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat,train,0,2\nb.mp4,cat,train,abc,\n")
    assert "ann.csv:2: column 4 (start): 'abc' is not a time in seconds" in text


def test_end_before_start_is_rejected(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat,train,3,1\n")
    assert "ann.csv:1: column 5 (end): 1.0 is not after start 3.0" in text


def test_header_row_is_read_as_a_header_not_as_a_class(tmp_path):
    data, storage = _generic(tmp_path, "filename,label,split\na.mp4,cat,train\nb.mp4,dog,test\n")
    m = build_manifest(data, storage)
    assert m.classes == ["cat", "dog"]
    assert [(r.uri.rsplit("/", 1)[1], r.split) for r in m.rows] == [("b.mp4", "test"), ("a.mp4", "train")]


def test_header_columns_may_come_in_any_order(tmp_path):
    data, storage = _generic(tmp_path, "split,class,path\ntest,dog,b.mp4\n")
    m = build_manifest(data, storage)
    assert (m.classes, m.rows[0].split, m.rows[0].uri.rsplit("/", 1)[1]) == (["dog"], "test", "b.mp4")


def test_header_without_a_label_column_is_rejected(tmp_path):
    text = _problems(tmp_path, "path,split\na.mp4,train\n")
    assert "ann.csv:1: header has no label column" in text


def test_empty_label_is_rejected(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat\nb.mp4, \n")
    assert "ann.csv:2: column 2 (label) is empty" in text


def test_file_in_both_train_and_test_is_a_leak(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat,train\nb.mp4,cat,train\na.mp4,cat,test\n")
    assert (f"ann.csv:3: column 3 (split): 'a.mp4' is the file of ann.csv:1 ('a.mp4', {tmp_path}/videos/a.mp4), "
            "listed in 'train' and 'test' (a train/test leak)") in text


def test_file_under_two_labels_is_rejected(tmp_path):
    text = _problems(tmp_path, "a.mp4,cat\na.mp4,dog\n")
    assert "ann.csv:2: column 2 (label): 'a.mp4' is the file of ann.csv:1 ('a.mp4'" in text
    assert "listed as 'cat' and 'dog'" in text


def test_one_file_spelled_four_ways_is_one_file_in_the_leak_check(tmp_path):
    root = tmp_path / "videos"
    _generic(tmp_path, "")
    (root / "link.mp4").symlink_to(root / "a.mp4")
    text = _problems(tmp_path, f"a.mp4,cat,train\n./a.mp4,cat,test\nfile://{root}/a.mp4,dog,train\n"
                               "link.mp4,cat,test\n")
    assert "3 problem(s)" in text
    for line, spelling in ((2, "./a.mp4"), (3, f"file://{root}/a.mp4"), (4, "link.mp4")):
        assert f"ann.csv:{line}: column" in text and f"{spelling!r} is the file of ann.csv:1 ('a.mp4', {root}/a.mp4)" in text
    assert "listed as 'cat' and 'dog'" in text and text.count("(a train/test leak)") == 2


def _outside_rows(tmp_path) -> tuple[str, str]:
    """Rows reaching outside data.root three ways (absolute, file://, a symlink inside the root), each to a real file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("x.mp4", "y.mp4", "z.mp4"):
        (elsewhere / name).write_bytes(b"x")
    _generic(tmp_path, "")
    (tmp_path / "videos" / "inside-link.mp4").symlink_to(elsewhere / "z.mp4")
    return f"a.mp4,cat\n{elsewhere}/x.mp4,cat\nfile://{elsewhere}/y.mp4,dog\ninside-link.mp4,dog\n", str(elsewhere)


def test_rows_resolving_outside_data_root_are_refused_with_their_lines(tmp_path):
    text, elsewhere = _outside_rows(tmp_path)
    message = _problems(tmp_path, text)
    assert "3 problem(s)" in message
    for line, name in ((2, "x.mp4"), (3, "y.mp4"), (4, "z.mp4")):
        assert f"ann.csv:{line}: column 1 (path):" in message and f"resolves to {elsewhere}/{name}, outside data.root" in message
    assert "data.allow_outside_root=true" in message


def test_rows_outside_data_root_are_read_with_the_opt_in(tmp_path):
    text, _ = _outside_rows(tmp_path)
    data, storage = _generic(tmp_path, text)
    m = build_manifest(data.model_copy(update={"allow_outside_root": True}), storage)
    assert sorted(r.uri.rsplit("/", 1)[1] for r in m.rows) == ["a.mp4", "inside-link.mp4", "x.mp4", "y.mp4"]
    assert m.missing == []


def test_s3_rows_compare_by_normalised_key(s3_storage):
    storage, bucket = s3_storage
    _touch(storage, f"{bucket}/videos", "a.mp4")
    _touch(storage, f"{bucket}/other", "b.mp4")
    csv_uri = f"{bucket}/ann.csv"
    storage.write_text(csv_uri, f"a.mp4,cat,train\n{bucket}/videos/./a.mp4,cat,test\n{bucket}/videos/../other/b.mp4,dog\n")
    with pytest.raises(AnnotationError) as info:
        build_manifest(DataConfig(dataset="generic_csv", root=f"{bucket}/videos", annotations=csv_uri), storage)
    text = str(info.value)
    assert "ann.csv:2: column 3 (split):" in text and "(a train/test leak)" in text
    assert "ann.csv:3: column 1 (path):" in text and f"resolves to {bucket}/other/b.mp4, outside data.root" in text


def test_every_bad_row_is_reported_at_once(tmp_path):
    text = _problems(tmp_path, "a.mp4,,train\nb.mp4,cat,train,abc\nc.mp4\n")
    assert "3 problem(s)" in text and all(f"ann.csv:{n}:" in text for n in (1, 2, 3))


def test_a_header_naming_the_first_columns_keeps_the_window_columns_in_place(tmp_path):
    data, storage = _generic(tmp_path, "path,label,split\na.mp4,cat,train,1,2\n")
    row = build_manifest(data, storage).rows[0]
    assert (row.start_s, row.end_s) == (1.0, 2.0)


def test_annotation_errors_survive_pickling_with_their_rows(tmp_path):
    import pickle

    data, storage = _generic(tmp_path, "a.mp4\n")
    with pytest.raises(AnnotationError) as info:
        build_manifest(data, storage)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems


def test_a_dataset_folder_symlink_leading_out_of_data_root_is_refused(tmp_path):
    storage = _ucf(tmp_path, ["Archery", "YoYo"])
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "videos" / "YoYo").rename(elsewhere)
    (tmp_path / "videos" / "YoYo").symlink_to(elsewhere)
    with pytest.raises(AnnotationError, match=rf"YoYo/v_YoYo_g11_c01.avi resolves to {elsewhere}/v_YoYo_g11_c01.avi, "
                                              "outside data.root .*data.allow_outside_root=true"):
        build_manifest(_data(tmp_path, "ucf101"), storage)
    assert len(build_manifest(_data(tmp_path, "ucf101", allow_outside_root=True), storage).rows) == 4
