import json
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.data.spair import PAIR_FIELDS, load_split


def test_sample_test_split_equals_json_files(spair_sample):
    split = load_split(spair_sample, "test")
    files = sorted((spair_sample / "PairAnnotation" / "test").glob("*.json"))
    assert len(split.pairs) == len(files) == 7
    by_name = split.pairs.set_index("filename", drop=False)
    for path in files:
        record = json.loads(path.read_text())
        row = by_name.loc[record["filename"]]
        for field in PAIR_FIELDS:
            value = row[field]
            value = value.tolist() if hasattr(value, "tolist") else value
            if field.endswith("_kps"):
                value = [list(p) for p in value]
            assert value == record[field], field
        assert row["src_image"] == f"{record['category']}/{Path(record['src_imname']).stem}"
        assert (row["trg_width"], row["trg_height"]) == tuple(record["trg_imsize"][:2])


def test_sample_images_keyed_by_category_and_name(spair_sample):
    split = load_split(spair_sample, "test")
    assert split.images["image"].is_unique
    used = set(split.pairs["src_image"]) | set(split.pairs["trg_image"])
    assert used == set(split.images["image"])
    plane = split.images.set_index("image").loc["aeroplane/2008_002719"]
    assert (plane["width"], plane["height"], plane["path"]) == (500, 333, "JPEGImages/aeroplane/2008_002719.jpg")


def test_layout_list_names_pair_files(spair_sample):
    with pytest.raises(PipelineError, match=r"000002-2008_001546-2008_005078:aeroplane.json: pair annotation file is missing"):
        load_split(spair_sample, "val", layout="small")


def test_category_filter(spair_sample):
    assert set(load_split(spair_sample, "test", categories=["dog"]).pairs["category"]) == {"dog"}
    with pytest.raises(PipelineError, match=r"categories: unknown category \['unicorn'\]"):
        load_split(spair_sample, "test", categories=["unicorn"])


def _edit_pair(root: Path, **changes) -> Path:
    path = next((root / "PairAnnotation" / "test").glob("000001-*.json"))
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"trg_kps": [[39, 145], [364, 171], [900, 173]]}, r"trg_kps\[2\]: keypoint \[900, 173\] outside the 500 x 332 \(W x H\) image"),
        ({"src_kps": [[212, 153]]}, r"src_kps: 1 keypoints but 3 kps_ids"),
        ({"trg_bndbox": [36, 92, 36, 200]}, r"trg_bndbox: zero-area box"),
        ({"kps_ids": [], "src_kps": [], "trg_kps": []}, r"kps_ids: no keypoints"),
        ({"mirror": "no"}, r"mirror: expected int"),
    ],
)
def test_bad_pair_fields_name_file_and_field(spair_sample, changes, message):
    path = _edit_pair(spair_sample, **changes)
    with pytest.raises(PipelineError, match=message) as info:
        load_split(spair_sample, "test")
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_malformed_json(spair_sample):
    path = next((spair_sample / "PairAnnotation" / "test").glob("000002-*.json"))
    path.write_text(path.read_text()[:100])
    with pytest.raises(PipelineError, match=r"000002-.*\.json: unreadable JSON"):
        load_split(spair_sample, "test")


def test_missing_field(spair_sample):
    path = next((spair_sample / "PairAnnotation" / "test").glob("000002-*.json"))
    record = json.loads(path.read_text())
    del record["trg_bndbox"]
    path.write_text(json.dumps(record))
    with pytest.raises(PipelineError, match=r"\.json: trg_bndbox: missing"):
        load_split(spair_sample, "test")


def test_image_problems(spair_sample):
    image = spair_sample / "JPEGImages" / "dog" / "2007_009889.jpg"
    image.write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match=r"2007_009889.jpg: unreadable image"):
        load_split(spair_sample, "test")
    from PIL import Image

    Image.new("RGB", (10, 10)).save(image)
    with pytest.raises(PipelineError, match=r"2007_009889.jpg: size: image is 10 x 10 \(W x H\) but annotated .*trg_imsize\); used by"):
        load_split(spair_sample, "test")


def test_empty_split(tmp_path):
    (tmp_path / "PairAnnotation" / "trn").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"split 'trn' has no pairs"):
        load_split(tmp_path, "trn")
    with pytest.raises(PipelineError, match=r"PairAnnotation/val: folder is missing"):
        load_split(tmp_path, "val")
