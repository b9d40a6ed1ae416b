"""Annotation formats, the label map, and the clip dataset with skipped clips."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import VIDEOS, need_shared
from stadapter.config import TaskSpec
from stadapter.errors import ConfigError, StadapterError
from stadapter.video.datasets import (AnnotationError, Sample, SkipCounter, Skipped, VideoClipDataset,
                                      check_num_classes, collate_skip, detect_format, load_annotations,
                                      load_labels, save_labels)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SPEC = TaskSpec(num_frames=4, frame_stride=2, temporal_views=2, spatial_views=3)


# ------------------------------------------------------------------------------------------------ formats

def test_list_file_with_indices_and_labels_json(tmp_path):
    (tmp_path / "train.txt").write_text("# comment\na/clip one.mp4 1\n\nb/two.mp4 0\n/abs/three.mp4 1\n")
    save_labels(["cat", "dog"], tmp_path / "labels.json")
    samples, classes = load_annotations(tmp_path / "train.txt")
    assert classes == ["cat", "dog"]
    assert samples == [Sample(tmp_path / "a" / "clip one.mp4", 1), Sample(tmp_path / "b/two.mp4", 0),
                       Sample(Path("/abs/three.mp4"), 1)]
    assert detect_format(tmp_path / "train.txt") == "list"


def test_list_file_with_names_and_root(tmp_path):
    (tmp_path / "l.txt").write_text("x.mp4 waving\ny.mp4 jumping\nz.mp4 waving\n")
    samples, classes = load_annotations(tmp_path / "l.txt", root=tmp_path / "videos")
    assert classes == ["jumping", "waving"]  # derived, sorted
    assert [s.label for s in samples] == [1, 0, 1]
    assert samples[0].path == tmp_path / "videos" / "x.mp4"
    # a fixed label map (e.g. the training set's) maps names and refuses unknown ones
    samples, classes = load_annotations(tmp_path / "l.txt", classes=["waving", "jumping", "other"])
    assert [s.label for s in samples] == [0, 1, 0] and len(classes) == 3
    with pytest.raises(AnnotationError, match="l.txt:1.*'waving'"):
        load_annotations(tmp_path / "l.txt", classes=["jumping"])


def test_list_file_indices_without_names(tmp_path):
    (tmp_path / "l.txt").write_text("x.mp4 2\ny.mp4 0\n")
    samples, classes = load_annotations(tmp_path / "l.txt")
    assert classes == ["0", "1", "2"] and [s.label for s in samples] == [2, 0]


def test_list_file_bad_line(tmp_path):
    (tmp_path / "l.txt").write_text("x.mp4 1\nnolabel\n")
    with pytest.raises(AnnotationError, match="l.txt:2"):
        load_annotations(tmp_path / "l.txt")


def test_csv_with_header(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nv/1.mp4,run\nv/2.mp4,walk\nv/3.mp4,run\n")
    assert detect_format(tmp_path / "a.csv") == "csv"
    samples, classes = load_annotations(tmp_path / "a.csv")
    assert classes == ["run", "walk"] and [s.label for s in samples] == [0, 1, 0]
    assert samples[1].path == tmp_path / "v/2.mp4"
    (tmp_path / "b.csv").write_text("file,name\nv/1.mp4,run\n")
    with pytest.raises(AnnotationError, match="'path' and 'label'"):
        load_annotations(tmp_path / "b.csv")


def k400_tree(tmp_path):
    ann = tmp_path / "kinetics400"
    ann.mkdir()
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    (ann / "train.csv").write_text(header + "riding a segway,R6llTwEh07w,14,24,train,0\n"
                                            "abseiling,--07WQ2iBlw,1,11,train,0\n"
                                            "air drumming,-VtLx-mcPds,3,13,train,0\n"
                                            "abseiling,missingclip,30,40,train,0\n")
    (ann / "validate.csv").write_text(header + "abseiling,valclip00xx,0,10,val,0\n")
    root = tmp_path / "videos"
    for rel in ["riding a segway/R6llTwEh07w_000014_000024.mp4", "abseiling/--07WQ2iBlw_000001_000011.mp4",
                "-VtLx-mcPds_000003_000013.mp4"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "air_drumming").mkdir()
    return ann, root


def test_kinetics_csv(tmp_path, caplog):
    ann, root = k400_tree(tmp_path)
    assert detect_format(ann) == "k400" and detect_format(ann / "train.csv") == "k400"
    with caplog.at_level(logging.WARNING):
        samples, classes = load_annotations(ann, split="train", root=root)
    assert classes == ["abseiling", "air drumming", "riding a segway"]
    assert samples[0] == Sample(root / "riding a segway" / "R6llTwEh07w_000014_000024.mp4", 2)
    assert samples[1].path == root / "abseiling" / "--07WQ2iBlw_000001_000011.mp4"
    assert samples[2].path == root / "-VtLx-mcPds_000003_000013.mp4"  # flat layout
    assert samples[3].path == root / "abseiling" / "missingclip_000030_000040.mp4"  # kept; skipped later
    assert "1 of 4 clips" in caplog.text
    val, _ = load_annotations(ann, split="val", root=root, classes=classes)
    assert val[0].label == 0
    (tmp_path / "test.csv").write_text("youtube_id,time_start,time_end,split\nabc,0,10,test\n")
    with pytest.raises(AnnotationError, match="label"):
        load_annotations(tmp_path / "test.csv")


def test_kinetics_underscore_label_folders(tmp_path):
    ann, root = k400_tree(tmp_path)
    (root / "air_drumming" / "x_000001_000002.mp4").write_bytes(b"x")
    (ann / "one.csv").write_text("label,youtube_id,time_start,time_end,split\nair drumming,x,1,2,train\n")
    samples, _ = load_annotations(ann / "one.csv", root=root)
    assert samples[0].path == root / "air_drumming" / "x_000001_000002.mp4"


def ssv2_tree(tmp_path):
    d = tmp_path / "ssv2"
    d.mkdir()
    labels = {"Pushing something from left to right": "0", "Pushing something from right to left": "1",
              "Putting something on a surface": "2"}
    (d / "something-something-v2-labels.json").write_text(json.dumps(labels))
    train = [{"id": "1001", "label": "pushing a cup from left to right",
              "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
             {"id": "1002", "label": "putting pen on a surface", "template": "Putting [something] on a surface",
              "placeholders": ["pen"]}]
    val = [{"id": "2001", "label": "pushing a box from right to left",
            "template": "Pushing [something] from right to left", "placeholders": ["a box"]}]
    (d / "something-something-v2-train.json").write_text(json.dumps(train))
    (d / "something-something-v2-validation.json").write_text(json.dumps(val))
    return d


def test_ssv2(tmp_path):
    d = ssv2_tree(tmp_path)
    assert detect_format(d) == "ssv2"
    samples, classes = load_annotations(d, split="train", root=tmp_path / "webm")
    assert classes[1] == "Pushing something from right to left" and len(classes) == 3
    assert samples == [Sample(tmp_path / "webm" / "1001.webm", 0), Sample(tmp_path / "webm" / "1002.webm", 2)]
    val, _ = load_annotations(d, split="validation")
    assert val == [Sample(d / "2001.webm", 1)]
    one, _ = load_annotations(d / "something-something-v2-validation.json")
    assert one == val
    bad = [{"id": "9", "template": "Juggling [something]"}]
    (d / "something-something-v2-validation.json").write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match="Juggling something"):
        load_annotations(d, split="val")


def test_ucf101(tmp_path):
    d = tmp_path / "ucfTrainTestlist"
    d.mkdir()
    (d / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 SoccerJuggling\n")
    (d / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
                                       "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\r\n")
    (d / "testlist01.txt").write_text("SoccerJuggling/v_SoccerJuggling_g23_c01.avi\n"
                                      "handstandpushups/v_HandStandPushups_g01_c01.avi\n")
    assert detect_format(d) == "ucf101" and detect_format(d / "trainlist01.txt") == "ucf101"
    root = tmp_path / "UCF-101"
    train, classes = load_annotations(d, split="train", root=root)
    assert classes == ["ApplyEyeMakeup", "HandstandPushups", "SoccerJuggling"]
    assert train == [Sample(root / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0),
                     Sample(root / "HandstandPushups/v_HandStandPushups_g08_c01.avi", 1)]
    test, _ = load_annotations(d, split="test", root=root)
    assert [s.label for s in test] == [2, 1]
    with pytest.raises(AnnotationError, match="testlist02"):
        load_annotations(d, split="test", fold=2)


def test_hmdb51(tmp_path):
    d = tmp_path / "testTrainMulti_7030_splits"
    d.mkdir()
    (d / "wave_test_split1.txt").write_text("a_wave_0.avi 1 \nb_wave_1.avi 2 \nc_wave_2.avi 0 \n")
    (d / "cartwheel_test_split1.txt").write_text("a_cart_0.avi 2 \nb_cart_1.avi 1 \n")
    (d / "wave_test_split2.txt").write_text("a_wave_0.avi 2 \n")
    (d / "cartwheel_test_split2.txt").write_text("a_cart_0.avi 1 \n")
    assert detect_format(d) == "hmdb51"
    train, classes = load_annotations(d, split="train", root=tmp_path / "hmdb")
    assert classes == ["cartwheel", "wave"]
    assert train == [Sample(tmp_path / "hmdb/cartwheel/b_cart_1.avi", 0),
                     Sample(tmp_path / "hmdb/wave/a_wave_0.avi", 1)]
    test, _ = load_annotations(d, split="test")
    assert [s.path.name for s in test] == ["a_cart_0.avi", "b_wave_1.avi"]
    fold2, _ = load_annotations(d, split="train", fold=2)
    assert [s.path.name for s in fold2] == ["a_cart_0.avi"]


def test_unknown_inputs(tmp_path):
    with pytest.raises(AnnotationError, match="no such"):
        load_annotations(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationError, match="cannot tell"):
        load_annotations(tmp_path / "empty")
    (tmp_path / "l.txt").write_text("a.mp4 0\n")
    with pytest.raises(AnnotationError, match="format"):
        load_annotations(tmp_path / "l.txt", fmt="coco")
    with pytest.raises(AnnotationError, match="split"):
        load_annotations(tmp_path / "empty", fmt="hmdb51", split="holdout")


def test_label_map_roundtrip_and_head_check(tmp_path):
    path = save_labels(["a", "b c", "ü"], tmp_path / "labels.json")
    assert json.loads(path.read_text(encoding="utf-8")) == ["a", "b c", "ü"]
    assert load_labels(path) == ["a", "b c", "ü"]
    (tmp_path / "ssv2.json").write_text(json.dumps({"y": "1", "x": "0"}))
    assert load_labels(tmp_path / "ssv2.json") == ["x", "y"]
    check_num_classes(["a", "b"], 2)
    with pytest.raises(ConfigError, match="2 classes but the head has 5 outputs"):
        check_num_classes(["a", "b"], 5)
    (tmp_path / "bad.json").write_text('["a", "a"]')
    with pytest.raises(AnnotationError, match="repeat"):
        load_labels(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------ dataset

@pytest.fixture
def clips(tmp_path):
    """Two real clips, a zero-byte one and a truncated one."""
    good = [need_shared(VIDEOS / "labelled/TrumanShow_wave_f_nm_np1_fr_med_26.avi"),
            need_shared(VIDEOS / "footage/carphone_distorted.mp4")]
    empty = tmp_path / "zero_bytes.mp4"
    empty.write_bytes(b"")
    src = need_shared(VIDEOS / "labelled/WUzgd7C1pWA.mp4")  # moov at the end: a cut copy cannot open
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return [Sample(good[0], 0), Sample(empty, 1), Sample(good[1], 1), Sample(cut, 0)]


def test_dataset_train_and_test_items(clips):
    train = VideoClipDataset(clips, SPEC, 32, MEAN, STD, train=True, seed=0)
    clip, label = train[0]
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32 and label == 0
    test = VideoClipDataset(clips, SPEC, 32, MEAN, STD, train=False)
    views, label = test[2]
    assert views.shape == (6, 4, 3, 32, 32) and label == 1  # 2 temporal x 3 spatial views


def test_bad_clips_are_skipped_and_counted(clips, caplog):
    ds = VideoClipDataset(clips, SPEC, 32, MEAN, STD, train=True)
    with caplog.at_level(logging.WARNING):
        item = ds[1]
    assert isinstance(item, Skipped) and not item and "zero_bytes.mp4" in item.reason
    assert "zero_bytes.mp4" in caplog.text
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip)
    counter = SkipCounter(min_attempts=100)
    warnings = []
    counter.warn = warnings.append
    for _ in range(2):  # two epochs: each bad file warned about once
        for batch in loader:
            assert batch.clips.shape == (2, 4, 3, 32, 32)
            assert batch.labels.tolist() == [0, 1]
            counter.update(batch)
    assert counter.skipped == 4 and counter.attempts == 8
    assert sorted(p.rsplit("/", 1)[-1] for p in counter.files) == ["truncated.mp4", "zero_bytes.mp4"]
    assert len(warnings) == 2 and "skipped 4 of 8 clips (2 files)" == counter.summary()


def test_all_skipped_batch(tmp_path):
    bad = tmp_path / "z.mp4"
    bad.write_bytes(b"")
    batch = collate_skip([VideoClipDataset([Sample(bad, 0)], SPEC, 32, MEAN, STD, True)[0], None])
    assert batch.clips is None and batch.labels is None and len(batch.skipped) == 2


def test_mostly_broken_dataset_stops_with_examples(tmp_path):
    samples = []
    for i in range(10):
        p = tmp_path / f"broken_{i}.mp4"
        p.write_bytes(b"" if i % 2 else b"not a video" * 10)
        samples.append(Sample(p, 0))
    ds = VideoClipDataset(samples, SPEC, 32, MEAN, STD, train=True)
    counter = SkipCounter(warn=lambda m: None)
    with pytest.raises(StadapterError, match=r"8 of 8 clips could not be decoded.*broken_0.mp4"):
        for batch in DataLoader(ds, batch_size=2, collate_fn=collate_skip):
            counter.update(batch)
    ok = SkipCounter(warn=lambda m: None)
    ok.update(ok=7, skipped=[Skipped(None, "x")] * 3)
    ok.update(ok=5, skipped=[Skipped(None, "y")])  # 4 of 16: fine


def test_augmentation_deterministic_per_seed_epoch_index(tmp_path):
    from stadapter.video.synthetic import clip_rng, render_clip, write_mp4

    path = tmp_path / "c.mp4"
    write_mp4(path, render_clip("grow", clip_rng(0, 6, 0), frames=24, size=48))
    spec = TaskSpec(num_frames=4, sampling="segments", train_crop="random-resized", flip=False,
                    direction_sensitive=True, rand_augment="rand-m7-n4-mstd0.5-inc1")
    samples = [Sample(path, 0)] * 3

    def item(seed, epoch, index):
        ds = VideoClipDataset(samples, spec, 32, MEAN, STD, train=True, seed=seed)
        ds.set_epoch(epoch)
        return ds[index][0]

    a = item(0, 1, 2)
    assert torch.equal(a, item(0, 1, 2))  # a resumed run sees the same clip
    assert not torch.equal(a, item(0, 2, 2))  # another epoch, another augmentation
    assert not torch.equal(a, item(0, 1, 1))
    assert not torch.equal(a, item(1, 1, 2))
    test = VideoClipDataset(samples, spec, 32, MEAN, STD, train=False)
    assert torch.equal(test[0][0], test[1][0])  # no randomness at test time


def test_dataset_with_dataloader_workers(tmp_path):
    from stadapter.video.synthetic import generate

    synth = generate(tmp_path / "s", clips_per_class=1, frames=8, size=32, val_fraction=0)
    samples, classes = load_annotations(synth.train)
    ds = VideoClipDataset(samples, TaskSpec(num_frames=4, sampling="segments", flip=False), 32, MEAN, STD,
                          train=True, seed=3)
    ds.set_epoch(5)
    one = [b for b in DataLoader(ds, batch_size=4, collate_fn=collate_skip)]
    two = [b for b in DataLoader(ds, batch_size=4, collate_fn=collate_skip, num_workers=2)]
    for b1, b2 in zip(one, two):
        assert torch.equal(b1.clips, b2.clips) and torch.equal(b1.labels, b2.labels)
    assert sum(len(b.labels) for b in one) == len(classes) == 8


def test_frame_cache_gives_the_same_items_and_keeps_bad_clips_skipped(clips):
    """--cache-clips: every epoch's items equal those decoded afresh; a bad clip is still a Skipped item."""
    cache: dict = {}
    for epoch in (0, 1):
        for train in (True, False):
            plain = VideoClipDataset(clips, SPEC, 32, MEAN, STD, train=train, seed=4)
            cached = VideoClipDataset(clips, SPEC, 32, MEAN, STD, train=train, seed=4, frame_cache=cache)
            plain.set_epoch(epoch)
            cached.set_epoch(epoch)
            for i in (0, 2):
                assert torch.equal(plain[i][0], cached[i][0]), (epoch, train, i)
            assert isinstance(cached[1], Skipped) and isinstance(cached[3], Skipped)
    assert sorted(cache) == [0, 2]  # decoded once each, kept across epochs
    assert cache[0].ndim == 4 and cache[0].shape[-1] == 3
