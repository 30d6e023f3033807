"""The toy world's report: chance level, AP50 read back, claims, mean ± spread over seeds."""
import json
import math

import pytest
import torch

from regionclip.toyworld.report import (
    chance_ap50,
    claims,
    class_name_cosine,
    last_logged,
    loss_curve,
    markdown_table,
    pick,
    random_class_embeddings,
    read_ap50,
    summarize,
    write_report,
)


def _grid_json(path, num_classes, images, novel=()):
    """Images of 64x64 holding one 16x16 box per class, side by side: boxes never overlap."""
    cats = [{"id": c + 1, "name": f"c{c}", "split": "unseen" if c in novel else "seen"}
            for c in range(num_classes)]
    anns = [{"id": i * num_classes + c + 1, "image_id": i + 1, "category_id": c + 1,
             "bbox": [20.0 * c, 0.0, 16.0, 16.0], "area": 256.0, "iscrowd": 0}
            for i in range(images) for c in range(num_classes)]
    data = {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": 20 * num_classes,
                        "height": 64} for i in range(images)],
            "annotations": anns, "categories": cats}
    path.write_text(json.dumps(data))
    return str(path)


def test_chance_is_perfect_with_one_class(tmp_path):
    # Every reported box is its own ground truth: any ranking is all true positives.
    assert chance_ap50(_grid_json(tmp_path / "one.json", 1, 10)) == pytest.approx(100.0)


def test_chance_is_near_the_class_prevalence(tmp_path):
    # A random ranking of 4 equally frequent classes: precision ~1/4 at every recall
    # (the 101-point interpolated envelope lifts it a little).
    path = _grid_json(tmp_path / "four.json", 4, 40, novel=(3,))
    value = chance_ap50(path, seed=0)
    assert 20.0 < value < 40.0
    assert chance_ap50(path, seed=0) == value
    assert chance_ap50(path, seed=1) != value


def test_read_ap50_reads_the_evaluation_metrics(tmp_path):
    (tmp_path / "inference").mkdir()
    bbox = {"AP": 1.0, "AP50_novel": 2.0, "AP50_base": 3.0, "AP50_all": 2.75}
    (tmp_path / "inference" / "metrics.json").write_text(json.dumps({"toy_test": {"bbox": bbox}}))
    assert read_ap50(str(tmp_path)) == {"novel": 2.0, "base": 3.0, "all": 2.75}
    # No detection at all: the evaluator reports NaN COCO metrics and no split.
    (tmp_path / "inference" / "metrics.json").write_text('{"t": {"bbox": {"AP50": NaN}}}')
    assert all(math.isnan(v) for v in read_ap50(str(tmp_path)).values())
    # NaN is written as null since evaluations write strict json
    (tmp_path / "inference" / "metrics.json").write_text(
        '{"t": {"bbox": {"AP50": null, "AP50_novel": null, "AP50_base": 1.0}}}')
    values = read_ap50(str(tmp_path))
    assert math.isnan(values["novel"]) and math.isnan(values["all"]) and values["base"] == 1.0


def test_loss_curve_keeps_training_records_only(tmp_path):
    lines = [{"iteration": 0, "total_loss": 3.0}, {"iteration": 1, "lr": 0.1},
             {"iteration": 2, "total_loss": 2.5}, {"bbox/AP50": 1.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines))
    assert loss_curve(str(tmp_path)) == [[0, 3.0], [2, 2.5]]


def test_last_logged_value_or_none_for_a_run_that_never_logged_it(tmp_path):
    lines = [{"iteration": 0, "pretrain/pseudo_label_kept": 0.9}, {"bbox/AP50": 1.0},
             {"iteration": 19, "pretrain/pseudo_label_kept": 0.8, "total_loss": 2.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines))
    assert last_logged(str(tmp_path), "pretrain/pseudo_label_kept") == 0.8
    assert last_logged(str(tmp_path), "fast_rcnn/cls_accuracy") is None


def _report(gt_teacher, gt_student, rpn_teacher, rpn_student, novel_student, novel_teacher,
            novel_no_focal, chance=5.0, seed=0, chance_rpn=5.0, chance_transfer=5.0):
    run = lambda novel: {"novel": novel, "base": 30.0, "all": 25.0}  # noqa: E731
    report = {"zero_shot": {"gt": {"teacher": gt_teacher, "student": gt_student},
                            "rpn": {"teacher": rpn_teacher, "student": rpn_student}},
              "transfer": {"from_student": run(novel_student), "from_teacher": run(novel_teacher),
                           "from_student_no_focal": run(novel_no_focal)},
              "chance_ap50": chance, "seed": seed, "seconds": 60.0, "class_name_cosine": 0.5,
              "chance_ap50_proposals": {"zero_shot": chance_rpn, "transfer": chance_transfer}}
    report["claims"] = claims(report)
    return report


def test_class_name_cosine_is_the_mean_over_pairs_of_classes(tmp_path):
    path = str(tmp_path / "names.pth")
    # unit vectors at 0, 90 and 45 degrees (scaled): cosines 0, 1/sqrt 2, 1/sqrt 2
    torch.save(torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]]), path)
    assert class_name_cosine(path) == pytest.approx(2 / 3 * math.sqrt(0.5), abs=1e-6)
    torch.save(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), path)  # same direction: not told apart
    assert class_name_cosine(path) == pytest.approx(1.0, abs=1e-6)
    torch.save(torch.tensor([[1.0, 2.0]]), path)
    with pytest.raises(ValueError, match="names.pth.*two classes"):
        class_name_cosine(path)


def test_claims_hold_only_when_measured_so():
    held = _report(20.0, 31.0, 10.0, 12.0, 15.0, 10.0, 12.0)["claims"]
    assert all(held.values())
    missed = _report(20.0, 29.0, 12.0, 12.0, 10.0, 10.0, 11.0, chance=12.0, chance_rpn=12.0,
                     chance_transfer=12.0)["claims"]
    assert not any(missed.values())


@pytest.mark.parametrize("gt_chance, rpn_chance, transfer_chance, above", [
    (5.0, 5.0, 5.0, True),
    (11.0, 5.0, 5.0, True),    # RPN-mode numbers (10, 12) are held against their own chance
    (5.0, 11.0, 5.0, False),   # ... and fail it when they do not pass it
    (5.0, 5.0, 25.0, False),   # transfer (all-class 25.0) against the transfer setting's chance
    (21.0, 5.0, 5.0, False),   # ground-truth-box numbers (20, 31) against the GT-box chance
])
def test_each_number_is_held_against_the_chance_on_its_own_boxes(gt_chance, rpn_chance,
                                                                   transfer_chance, above):
    report = _report(20.0, 31.0, 10.0, 12.0, 15.0, 10.0, 12.0, chance=gt_chance,
                     chance_rpn=rpn_chance, chance_transfer=transfer_chance)
    assert report["claims"]["all_above_chance"] is above


def test_random_class_embeddings_have_the_shape_of_the_real_ones_and_follow_the_seed(tmp_path):
    real = tmp_path / "classes.pth"
    torch.save(torch.ones(20, 64), real)
    for name, seed in (("a.pth", 0), ("b.pth", 0), ("c.pth", 1)):
        random_class_embeddings(str(real), str(tmp_path / name), seed)
    a, b, c = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pth", "b.pth", "c.pth"))
    assert a.shape == (20, 64) and torch.equal(a, b) and not torch.equal(a, c)
    cosine = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).t()
    assert cosine[~torch.eye(20, dtype=torch.bool)].abs().max() < 0.6  # no two alike


def test_summarize_gives_mean_spread_and_claim_counts():
    reports = [_report(20.0, 31.0, 10.0, 12.0, 15.0, 10.0, 12.0, seed=0),
               _report(24.0, 29.0, 10.0, 12.0, 15.0, 10.0, 12.0, seed=1)]
    summary = summarize(reports)
    assert summary["zero_shot"]["gt"]["teacher"] == {"mean": 22.0, "spread": 2.0}
    assert summary["claims"]["student_beats_teacher_gt_by_10"] == {"held": 1, "of": 2}
    assert pick(summary, "mean")["zero_shot"]["gt"]["student"] == 30.0
    assert "claims" not in pick(summary, "mean") and "claims" not in pick(summary, "spread")
    assert pick(summary["claims"], "held")["student_beats_teacher_rpn"] == 2
    assert "| ground-truth boxes | 22.0 ± 2.0 | 30.0 ± 1.0 |" in markdown_table(summary)


def _refuse(constant):
    raise ValueError(f"{constant} is not json")


def test_write_report_writes_json_markdown_and_curves(tmp_path):
    report = _report(20.0, 31.0, 10.0, float("nan"), 15.0, 10.0, 12.0)
    report["pseudo_label_kept"] = 0.997
    write_report(str(tmp_path), report, {"teacher": 12.0}, {"teacher": "python x"},
                 {"teacher": [[0, 3.0], [1, 2.0]]})
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=_refuse)
    assert saved["zero_shot"]["gt"]["student"] == 31.0
    assert saved["zero_shot"]["rpn"]["student"] is None  # NaN is not json
    assert saved["stage_seconds"] == {"teacher": 12.0}
    text = (tmp_path / "REPORT.md").read_text()
    assert "| RPN proposals | 10.0 | nan |" in text and "python x" in text
    assert "class-name embeddings: 0.500" in text
    assert "passes CONCEPT_THRES at the end of pretraining: 99.7 %" in text


def test_detics_runs_add_their_claims_and_rows_when_they_ran():
    report = _report(20.0, 31.0, 10.0, 12.0, 15.0, 10.0, 12.0)
    assert "image_labels_raise_novel" not in report["claims"]
    runs = report["transfer"]
    for name, novel in (("box_from_teacher", 2.0), ("image_labels_from_teacher", 3.0),
                        ("captions_from_teacher", 2.5), ("both_from_teacher", 3.5),
                        ("image_labels_from_student", 4.0)):
        runs[f"detic_{name}"] = {"novel": novel, "base": 6.0, "all": 5.0}
    held = claims(report)
    assert held["image_labels_raise_novel"] and held["captions_raise_novel"]
    assert held["both_best_on_novel"]
    assert not held["all_above_chance"]  # 5.0 AP50 of all classes is not above chance
    runs["detic_image_labels_from_teacher"]["novel"] = 2.0
    runs["detic_captions_from_teacher"]["novel"] = 4.0  # now above both
    held = claims(report)
    assert not held["image_labels_raise_novel"] and held["captions_raise_novel"]
    assert not held["both_best_on_novel"]
    assert "| detic captions from teacher | 4.0 | 6.0 | 5.0 |" in markdown_table(report)
