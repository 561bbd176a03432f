"""Caption language identification: py3langid, whose model ships inside the PyPI package (nothing is
downloaded at run time). Loaded once per process (~0.6 s), then ~0.1 ms a caption."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    # norm_probs: probabilities that sum to 1, so a confidence threshold means the same for any text
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> frozenset[str]:
    """The language codes the identifier can name (ISO 639-1 where one exists: en, de, zh, ...)."""
    return frozenset(_identifier().nb_classes)


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) of the most likely language of `text`."""
    language, probability = _identifier().classify(text)
    return str(language), float(probability)


def in_other_language(text: str, languages: tuple[str, ...], min_confidence: float) -> bool:
    """Whether `text` is confidently in a language outside `languages`. On two or three words the
    identifier spreads its probability over many languages ("der Hund": da 0.09), so such captions stay
    unless one language clearly wins."""
    language, probability = identify(text)
    return language not in languages and probability >= min_confidence
