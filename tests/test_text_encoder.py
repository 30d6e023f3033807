import json
import os

import open_clip
import pytest
import torch
from _clip_utils import official_text_shapes, openclip_reference, text_state_dict

from regionclip.config.variants import get_variant
from regionclip.data.coco import class_names_from_file
from regionclip.modeling.text_encoder import (
    TextEncoder,
    concept_embeddings,
    load_embeddings,
    save_embeddings,
)
from regionclip.prompts import PROMPT_TEMPLATES, prompt_engineering, tokenize

SOT, EOT = 49406, 49407


def _encoder_like(name: str) -> TextEncoder:
    encoder = TextEncoder(get_variant(name))
    encoder.load_state_dict(text_state_dict(openclip_reference(name)), strict=True)
    return encoder.eval()


@pytest.mark.parametrize("name", ["tiny", "RN50"])
def test_encode_text_equals_open_clip(name):
    tokens = tokenize(["a photo of a cat.", "two dogs"])
    with torch.no_grad():
        expected = openclip_reference(name).encode_text(tokens)
        actual = _encoder_like(name).encode_text(tokens)
    assert actual.shape == (2, get_variant(name).embed_dim)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _reference_token_features(model, tokens):
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x @ model.text_projection


def test_encode_text_all_tokens():
    tokens = tokenize(["a red car", "a dog on a mat"])
    encoder = _encoder_like("tiny")
    with torch.no_grad():
        features = encoder.encode_text(tokens, only_eot=False)
        expected = _reference_token_features(openclip_reference("tiny"), tokens)
        pooled = encoder(tokens)
    assert features.shape == (2, 77, get_variant("tiny").embed_dim)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features[torch.arange(2), tokens.argmax(-1)], pooled)


@pytest.mark.parametrize("name", ["RN50", "RN50x4", "tiny"])
def test_state_dict_equals_official_lang_encoder_keys(name):
    with torch.device("meta"):
        encoder = TextEncoder(get_variant(name))
    actual = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert actual == official_text_shapes(name)


def test_tokenize_hand_computed():
    tokens = tokenize("a photo of a cat.")
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    assert tokens[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
    assert not tokens[0, 8:].any()


def test_tokenize_truncates_keeping_eot():
    tokens = tokenize(["cat " * 100, "cat"])
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == SOT and tokens[0, -1] == EOT and (tokens[0, 1:-1] == 2368).all()


def test_prompt_templates():
    assert len(PROMPT_TEMPLATES) == 81 and len(set(PROMPT_TEMPLATES)) == 81
    assert PROMPT_TEMPLATES[:4] == ("{}.", "a photo of a {}.", "a bad photo of a {}.",
                                    "a photo of many {}.")
    assert PROMPT_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)


@pytest.mark.parametrize("name, template, expected", [
    ("cat", "a photo of a {}.", "a photo of a cat."),
    ("hot dog, frankfurter", "{}.", "hot dog frankfurter."),
    ("teddy+bear", "the toy {}.", "the toy teddy bear."),
    ("a,b+c", "{} and {}", "ab c and ab c"),
])
def test_prompt_engineering(name, template, expected):
    assert prompt_engineering(name, template) == expected


def _reference_concept_embeddings(names):
    """Independent recipe: each prompt alone through open_clip, mean of unnormalised rows."""
    model = openclip_reference("tiny")
    rows = []
    with torch.no_grad():
        for name in names:
            prompts = [t.format(name) for t in PROMPT_TEMPLATES]
            per_template = [model.encode_text(open_clip.tokenize([p]))[0] for p in prompts]
            rows.append(torch.stack(per_template).mean(0))
    return torch.stack(rows)


def test_concept_embeddings_equal_reference():
    names = ["cat", "traffic light", "dog"]
    actual = concept_embeddings(_encoder_like("tiny"), names, batch_size=50)
    assert actual.shape == (3, get_variant("tiny").embed_dim) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, _reference_concept_embeddings(names), rtol=1e-4,
                               atol=1e-5)


def test_concept_embeddings_single_name_stays_2d():
    encoder = _encoder_like("tiny")
    single = concept_embeddings(encoder, ["cat"])
    assert single.shape == (1, get_variant("tiny").embed_dim)
    torch.testing.assert_close(single, concept_embeddings(encoder, ["dog", "cat"])[1:])
    with pytest.raises(ValueError, match="at least one class name"):
        concept_embeddings(encoder, [])


def _write(path, content):
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_class_names_from_txt(tmp_path):
    path = _write(tmp_path / "concepts.txt", "cat\n\n traffic light \ndog\n\n")
    assert class_names_from_file(path) == ["cat", "traffic light", "dog"]


def test_class_names_from_coco_json_sorted_by_id(tmp_path):
    cats = [{"id": 3, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 2, "name": "car"}]
    path = _write(tmp_path / "coco.json", {"images": [], "categories": cats})
    assert class_names_from_file(path) == ["person", "car", "dog"]


def _lvis_json(tmp_path):
    cats = [
        {"id": 2, "name": "bow_(weapon)", "synset": "bow.n.04", "frequency": "r"},
        {"id": 1, "name": "aerosol_can", "synset": "can.n.01", "frequency": "c"},
        {"id": 3, "name": "teddy_bear", "synset": "teddy.n.01", "frequency": "f"},
    ]
    return _write(tmp_path / "lvis.json", {"images": [], "categories": cats})


def test_class_names_from_lvis_json_cleaned(tmp_path):
    path = _lvis_json(tmp_path)
    assert class_names_from_file(path) == ["aerosol can", "bow weapon", "teddy bear"]
    assert class_names_from_file(path, exclude_rare=True) == ["aerosol can", "teddy bear"]


def test_class_names_errors(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        class_names_from_file(missing)
    with pytest.raises(ValueError, match="empty.txt"):
        class_names_from_file(_write(tmp_path / "empty.txt", "\n\n"))
    with pytest.raises(ValueError, match=r"dup.txt.*\['cat'\]"):
        class_names_from_file(_write(tmp_path / "dup.txt", "cat\ndog\ncat\n"))
    with pytest.raises(ValueError, match="nocats.json"):
        class_names_from_file(_write(tmp_path / "nocats.json", {"images": []}))
    coco = _write(tmp_path / "coco.json", {"categories": [{"id": 1, "name": "cat"}]})
    with pytest.raises(ValueError, match="coco.json"):
        class_names_from_file(coco, exclude_rare=True)


def test_save_load_embeddings_round_trip(tmp_path):
    embeddings = torch.randn(5, 8)
    path = str(tmp_path / "sub" / "emb.pth")
    save_embeddings(embeddings[1:4], path)
    assert os.listdir(tmp_path / "sub") == ["emb.pth"]
    loaded = load_embeddings(path, expected_dim=8)
    assert torch.equal(loaded, embeddings[1:4]) and loaded.dtype == torch.float32
    save_embeddings(torch.zeros(2, 8), path)
    assert torch.equal(load_embeddings(path), torch.zeros(2, 8))


def test_load_embeddings_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_embeddings(str(tmp_path / "nope.pth"))
    one_d = str(tmp_path / "one_d.pth")
    torch.save(torch.zeros(4), one_d)
    with pytest.raises(ValueError, match=r"one_d.pth.*\(4,\)"):
        load_embeddings(one_d)
    as_dict = str(tmp_path / "dict.pth")
    torch.save({"emb": torch.zeros(2, 4)}, as_dict)
    with pytest.raises(ValueError, match="dict.pth.*dict"):
        load_embeddings(as_dict)
    wide = str(tmp_path / "wide.pth")
    torch.save(torch.zeros(2, 640), wide)
    with pytest.raises(ValueError, match="wide.pth holds 640-dim embeddings, expected 1024"):
        load_embeddings(wide, expected_dim=1024)
    with pytest.raises(ValueError, match=r"must be \[C, D\], got shape \(3,\)"):
        save_embeddings(torch.zeros(3), str(tmp_path / "bad.pth"))
