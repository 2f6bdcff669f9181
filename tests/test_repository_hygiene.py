"""Repository hygiene: no tracked text file carries an absolute path of a development machine or
a reference to this project's own tracker, which a reader of the repository cannot see.

Citations of other projects' issues are fine as links (https://github.com/owner/repo/issues/123)
or as owner/repo#123. The negative controls below run the same matcher on planted strings; they
are assembled from pieces so that this file itself stays clean.
"""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Absolute paths of a development machine: the home directories and the work tree of the machine
# the project was developed on.
MACHINE_PATH = re.compile("/(?:" + "|".join(["wo" + "rk", "ro" + "ot", "ho" + "me"]) + ")/")
# The word issue, ticket, pull request or PR followed by a number (with or without a hash, a
# space or a hyphen between them), and a bare hash-number after a space, a bracket or
# punctuation (not owner/repo#N, which cites another project, nor an HTML entity).
TRACKER_REFERENCE = re.compile(
    r"\b(?:issues?|tickets?|pull[ -]requests?|PRs?)[\s_-]*(?:no\.?\s*)?#?\d+"
    r"|(?:^|(?<=[\s(\[{,;:]))#\d+\b",
    re.IGNORECASE)
# Links are citations of other projects, never of this one: removed before matching.
LINK = re.compile(r"(?:https?://|www\.|github\.com/|gitlab\.com/)\S+")


def problems(text: str) -> list[str]:
    """Every offending match in `text`, as 'line N: match'."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        unlinked = LINK.sub("", line)
        for pattern in (MACHINE_PATH, TRACKER_REFERENCE):
            found += [f"line {number}: {m.group(0)!r}" for m in pattern.finditer(unlinked)]
    return found


def tracked_text_files() -> dict[str, str]:
    """{path: text} of every file git tracks that decodes as UTF-8 and holds no NUL byte."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    texts = {}
    for path in filter(None, listing.decode().split("\0")):
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue   # deleted in the work tree, not yet committed
        with open(full, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue
        try:
            texts[path] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def test_no_machine_paths_or_tracker_references_in_tracked_files():
    texts = tracked_text_files()
    assert any(path.endswith("README.md") for path in texts), "the listing found no README.md"
    offenders = {path: found for path, text in texts.items() if (found := problems(text))}
    report = "\n".join(f"{path}: {', '.join(found)}" for path, found in sorted(offenders.items()))
    assert not offenders, ("absolute machine paths or references to this project's tracker "
                           f"(cite other projects by URL):\n{report}")


DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w/.-]*\w\.(?:md|png)\b")


def test_paths_into_docs_exist():
    """Every docs/ file named in a tracked text file exists: pages move, mentions must follow."""
    missing = sorted({f"{path}: {match}" for path, text in tracked_text_files().items()
                      for match in DOCS_PATH.findall(text)
                      if not os.path.exists(os.path.join(ROOT, match))})
    assert not missing, "mentions of docs/ files that do not exist:\n" + "\n".join(missing)


def test_docs_path_pattern_finds_a_mention():
    """Negative control: a planted mention of a missing page is found, and reported missing."""
    page = _planted("docs/", "no_such_page.md")
    assert DOCS_PATH.findall(f"see {page}, section 2") == [page]
    assert not os.path.exists(os.path.join(ROOT, page))


def _planted(*parts: str) -> str:
    return "".join(parts)


@pytest.mark.parametrize("text", [
    _planted("see iss", "ue 14 for the figures"),
    _planted("as measured in iss", "ues 17 and 18"),
    _planted("Iss", "ue #", "3, what must be shown"),
    _planted("the iss", "ue-15 report"),
    _planted("fixed in (", "#14)"),
    _planted("see ", "#7"),
    _planted("PR", " 12 moved it"),
    _planted("--workdir=/wo", "rk/runs14b/base"),
    _planted("/ro", "ot/.cache/jax_diffusion"),
    _planted("/ho", "me/someone/jax_diffusion"),
])
def test_planted_offences_are_caught(text):
    assert problems(text), text


@pytest.mark.parametrize("text", [
    _planted("https://github.com/google/jax/iss", "ues/123"),
    _planted("github.com/huggingface/diffusers/pull/", "4567"),
    _planted("huggingface/diffusers", "#4567"),
    "an HTML entity &#123; and a heading anchor (#the-fid-convention)",
    "the step is issued from a thread; 14 issues remain unrelated to numbers",
    "~/.cache/jax_diffusion and /mnt/shared/runs/cifar10 and /tmp/bench",
    "t = 14, section 6.1, # 14 is a comment",
])
def test_allowed_text_passes(text):
    assert not problems(text), problems(text)
