"""Filter and captioner quality against the toy web's truth, attribute by attribute."""
from pipeline.toyweb.measures import captioner_quality, filter_quality, format_attributes, named_correctly

SCENE = {"shape": "circle", "colour": "red", "size": "small", "position": "left", "background": "white"}


def row(url, noise, caption):
    return {"url": url, "noise": noise, "noisy": noise != "none", "split": "web", "caption": caption, **SCENE}


TRUTH = {r["url"]: r for r in (
    row("u0", "none", "a small red circle on the left of a white background"),
    row("u1", "wrong_attribute", "a small red circle on the right of a white background"),
    row("u2", "wrong_attribute", "small red square, left, white backdrop"),
    row("u3", "mismatched", "a large blue cross on the top of a black background"),
)}


def decision(url, web_kept, synthetic):
    return {"url": url, "web_kept": web_kept, "synthetic_caption": synthetic}


def test_named_correctly_needs_the_true_value_and_no_rival():
    t = TRUTH["u0"]
    assert named_correctly("there is a red circle (small) in the left on white", t, "position")
    assert not named_correctly("a red circle on the right", t, "position")
    assert not named_correctly("a red circle left or right", t, "position")  # hedging is not naming
    assert not named_correctly(None, t, "colour")


def test_filter_quality_counts_wrong_attributes_by_the_attribute_that_is_wrong():
    decided = [decision("u0", True, ""), decision("u1", True, ""), decision("u2", False, ""), decision("u3", False, "")]
    q = filter_quality(decided, TRUTH)
    assert (q["pairs"], q["noisy"], q["removed"], q["precision"], q["recall"]) == (4, 3, 2, 1.0, 0.6667)
    by_attribute = q["wrong_attribute_removed"]
    assert by_attribute["position"] == {"removed": 0, "of": 1}
    assert by_attribute["shape"] == {"removed": 1, "of": 1}
    assert sum(v["of"] for v in by_attribute.values()) == q["removed_by_noise"]["wrong_attribute"]["of"]


def test_captioner_quality_per_attribute_and_all_five():
    decided = [decision("u0", True, "a small red circle on the left of a white background"),
               decision("u1", True, "a small red square on the right of a white background"),
               decision("u2", True, "red"),
               decision("elsewhere", True, "not in the truth")]
    q = captioner_quality(decided, TRUTH)
    assert q["images"] == 3
    assert q["correct"] == {"shape": round(1 / 3, 4), "colour": 1.0, "size": round(2 / 3, 4),
                            "position": round(1 / 3, 4), "background": round(2 / 3, 4)}
    assert q["all_correct"] == round(1 / 3, 4)
    table = format_attributes([{"round": 1, "filter": filter_quality(decided, TRUTH), "captioner": q}])
    assert "position" in table and "0 of 1" in table and "33.3%" in table
    assert captioner_quality([decision("elsewhere", True, "x")], TRUTH) is None
