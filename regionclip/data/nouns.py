"""Concept-pool nouns from captions: how many captions mention each candidate name.

A name matches a run of whole lower-cased alphanumeric words, its last word also in plural form
(regular, -man -> -men, a few irregular); the longest name at a position wins and consumes its
words ("hot dogs" counts "hot dog", not "dog"); a name counts once per caption. Candidates: the
COCO 80 names, then the names of an LVIS json when given (LVIS names are not shipped), which a
caption mentions without their qualifier ("bow" for ``bow_(weapon)``, as Detic tags captions).
spaCy
(``en_core_web_sm``) or nltk (tagger + WordNet), when installed, can propose further nouns.
"""
import logging
import os
import re
from collections import Counter
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .coco import json_class_names
from .coco_ovd import ALL_CATEGORIES
from .image_text_sources import CAPTIONS_JSONL, TAR_SUFFIXES, JsonlSource, WebDatasetSource
from .image_text_tsv import find_tsv_pairs, iter_tsv_texts

logger = logging.getLogger(__name__)

# The 15 COCO categories outside the 65 OVD ones: (COCO id, name).
COCO_EXTRA_CATEGORIES = (
    (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
    (37, "sports ball"), (39, "baseball bat"), (40, "baseball glove"), (43, "tennis racket"),
    (46, "wine glass"), (58, "hot dog"), (64, "potted plant"), (67, "dining table"),
    (77, "cell phone"), (88, "teddy bear"), (89, "hair drier"),
)
IRREGULAR_PLURALS = {
    "person": "people", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "ox": "oxen", "die": "dice",
}
_WORD = re.compile(r"[a-z0-9]+")
_NOUN = re.compile(r"[a-z][a-z-]*[a-z]")
NounParser = Callable[[str], List[str]]
# Candidate names, or name -> the phrase a caption mentions it by (default: the name itself).
Vocabulary = Union[Sequence[str], Mapping[str, str]]


def coco_class_names() -> List[str]:
    """The 80 COCO category names in COCO id order."""
    return [name for _, name in sorted(ALL_CATEGORIES + COCO_EXTRA_CATEGORIES)]


def default_vocabulary(lvis_json: Optional[str] = None) -> Dict[str, str]:
    """Name -> the phrase a caption mentions it by: the COCO 80 names, then the LVIS names of
    ``lvis_json`` (if given) not already present, cleaned as class names are ("bow weapon") and
    mentioned without their qualifier ("bow"; a phrase two names share counts for the first)."""
    vocabulary = {name: name for name in coco_class_names()}
    for name, written in json_class_names(lvis_json) if lvis_json else ():
        vocabulary.setdefault(name, written.split("(")[0].replace("_", " ").strip())
    return vocabulary


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def plural_forms(word: str) -> set:
    """Plausible plurals of a singular English noun (over-generation is harmless here)."""
    forms = {word + "s"}
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(word + "es")
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    if word.endswith("fe"):
        forms.add(word[:-2] + "ves")
    elif word.endswith("f"):
        forms.add(word[:-1] + "ves")
    if word.endswith("man"):
        forms.add(word[:-3] + "men")
    if word in IRREGULAR_PLURALS:
        forms.add(IRREGULAR_PLURALS[word])
    return forms


class MentionMatcher:
    """Finds the vocabulary names mentioned in a caption."""

    def __init__(self, vocabulary: Vocabulary):
        said = vocabulary if isinstance(vocabulary, Mapping) else {n: n for n in vocabulary}
        self.phrases: Dict[Tuple[str, ...], str] = {}
        for name, phrase in said.items():  # exact forms first: they win over another's plural
            self.phrases.setdefault(tuple(words(phrase)), name)
        for name, phrase in said.items():
            *head, last = words(phrase) or [""]
            for plural in plural_forms(last) if last else ():
                self.phrases.setdefault((*head, plural), name)
        self.phrases.pop((), None)
        self.max_words = max((len(p) for p in self.phrases), default=0)

    def names_in(self, caption: str) -> set:
        tokens, found, i = words(caption), set(), 0
        while i < len(tokens):
            for length in range(min(self.max_words, len(tokens) - i), 0, -1):
                name = self.phrases.get(tuple(tokens[i:i + length]))
                if name is not None:
                    found.add(name)
                    i += length
                    break
            else:
                i += 1
        return found


def count_mentions(captions: Iterable[str], vocabulary: Vocabulary) -> Counter:
    """Name -> number of captions that mention it (names never mentioned are absent)."""
    matcher = MentionMatcher(vocabulary)
    counts = Counter()
    for caption in captions:
        counts.update(matcher.names_in(caption))
    return counts


def select_nouns(counts: Counter, min_count: int) -> List[Tuple[str, int]]:
    """(name, count) with count >= min_count, most frequent first, ties by name."""
    kept = [(name, n) for name, n in counts.items() if n >= min_count]
    return sorted(kept, key=lambda item: (-item[1], item[0]))


def build_concept_nouns(captions: Iterable[str], vocabulary: Vocabulary, min_count: int,
                        parser: Optional[NounParser] = None) -> List[Tuple[str, int]]:
    """Frequent vocabulary names plus, with a parser, frequent nouns outside the vocabulary
    (both counted as the number of captions holding them)."""
    captions = list(captions) if parser is not None else captions
    counts = count_mentions(captions, vocabulary)
    if parser is not None:
        known = MentionMatcher(vocabulary).phrases
        for caption in captions:
            nouns = {n.strip().lower() for n in parser(caption)}
            counts.update(n for n in nouns if _NOUN.fullmatch(n) and (n,) not in known)
    return select_nouns(counts, min_count)


def load_noun_parser(kind: str = "auto") -> Optional[NounParser]:
    """caption -> noun lemmas, from spaCy or nltk ("auto" tries both); None when the library
    or its model/data is not installed, or for "none"."""
    if kind not in ("auto", "spacy", "nltk", "none"):
        raise ValueError(f"noun parser must be auto, spacy, nltk or none, got {kind!r}")
    kinds = ("spacy", "nltk") if kind == "auto" else () if kind == "none" else (kind,)
    for name in kinds:
        parser = _PARSER_LOADERS[name]()
        if parser is not None:
            logger.info("Proposing extra nouns with %s", name)
            return parser
    return None


def _spacy_parser() -> Optional[NounParser]:
    try:
        import spacy

        nlp = spacy.load("en_core_web_sm", disable=["parser", "ner"])
    except (ImportError, OSError) as error:
        logger.info("spaCy noun parser unavailable: %s", error)
        return None
    return lambda text: [t.lemma_ for t in nlp(text) if t.pos_ == "NOUN"]


def _nltk_parser() -> Optional[NounParser]:
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer

        lemmatizer = WordNetLemmatizer()
        lemmatizer.lemmatize(nltk.pos_tag(nltk.word_tokenize("two cats"))[-1][0])
    except (ImportError, LookupError) as error:
        logger.info("nltk noun parser unavailable: %s", error)
        return None

    def parse(text: str) -> List[str]:
        tagged = nltk.pos_tag(nltk.word_tokenize(text.lower()))
        return [lemmatizer.lemmatize(word) for word, tag in tagged if tag in ("NN", "NNS")]

    return parse


_PARSER_LOADERS = {"spacy": _spacy_parser, "nltk": _nltk_parser}
CAPTION_FORMATS = ("auto", "tsv", "webdataset", "jsonl", "txt")


def detect_caption_format(path: str) -> str:
    """tsv, webdataset, jsonl or txt (one caption per line) from a path's name or contents."""
    if os.path.isdir(path):
        names = os.listdir(path)
        if CAPTIONS_JSONL in names:
            return "jsonl"
        for form, suffixes in (("webdataset", TAR_SUFFIXES), ("tsv", (".tsv",))):
            if any(name.endswith(suffixes) for name in names):
                return form
        raise ValueError(f"cannot tell the caption format of folder {path}: no "
                         f"{CAPTIONS_JSONL}, tar shards or TSV files")
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".tsv"):
        return "tsv"
    if path.endswith(TAR_SUFFIXES) or "{" in path:
        return "webdataset"
    return "txt"


def _tsv_text_files(path: str) -> List[str]:
    # Only the text TSVs are read; a single .tsv that is no image TSV is a text TSV itself.
    try:
        return [text for _, text in find_tsv_pairs(path, max_files=0)]
    except ValueError:
        if os.path.isfile(path):
            return [path]
        raise


def iter_caption_texts(path: str, form: str = "auto") -> Iterable[str]:
    """Every caption (and TSV tags string) of a dataset in any of the pretraining forms, or of
    a txt file with one caption per line; images are not read."""
    form = detect_caption_format(path) if form == "auto" else form
    if form == "txt":
        with open(path, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
        return
    if form == "tsv":
        groups = iter_tsv_texts(_tsv_text_files(path))
    elif form == "jsonl":
        groups = JsonlSource(path).iter_captions()
    elif form == "webdataset":
        groups = WebDatasetSource(path).iter_captions()
    else:
        raise ValueError(f"caption format must be one of {CAPTION_FORMATS}, got {form!r}")
    for captions in groups:
        yield from captions
