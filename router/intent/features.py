"""Features of a message for the intent model: tokens, style marks and four hashed groups.

The model sees four groups of features, regularised differently (see train.py):

| group | what | regularisation |
|---|---|---|
| rule  | the rule classifier's cue sums and verdict; style marks (language-free) | light |
| cue   | each rule cue found ("complaint:投诉", "suggestion:would be nice") | light |
| shape | n-grams of the text, content words masked ("can i X ?", "希望X能X") | medium |
| lex   | token unigrams and bigrams (Han characters are tokens) | strong (L1) |

The rule and shape groups carry intent across domains; the lexical group fixes
what they miss in domains it has seen. Digits, URLs and @handles are masked.
`extract` is the reference; `IntentModel.predict_hits` computes the same features
faster from the same tables and expressions here.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
import zlib

from router.classify import PRIOR
from router.model import LABELS

# -- feature groups -------------------------------------------------------------
BITS = 20
MASK = (1 << BITS) - 1
G_RULE, G_CUE, G_SHAPE, G_LEX = 0, 1, 2, 3
GROUP_NAMES = ("rule", "cue", "shape", "lex")

# Words kept as themselves in the "shape" view of English text: function words,
# modal and question forms, and a few intent verbs. Everything else becomes X.
EN_FUNCTION = frozenset(
    """
    i me my mine myself we us our ours you your yours u ur he him his she her it its they them their
    this that these those there here a an the some any no not never none all every each more most
    less much many few other another own same such
    is am are was were be been being do does did done doing have has had having get got getting
    can could will would shall should may might must need needs needed want wants wanted like
    love hope hoping wish please plz pls thanks thank thx sorry help know tell let lets make made
    what how why when where which who whom whose whether if then than so but and or because though
    although unless until while as to of in on at for with without from by about into over after
    before again still already yet just even only also too very really quite so ever always
    ok okay yes yeah hey hi hello dear
    add adding allow allowing support supporting enable option options feature features improve
    suggest suggestion idea better instead able possible way
    problem problems issue issues wrong broken fix fixed refund complaint complain file
    again waiting wait received receive nobody anyone someone
    """.split()
)
# Han characters (and marks) kept in the shape view of Chinese text.
ZH_FUNCTION = frozenset(
    "吗呢吧啊呀哦嘛么了的地得着过是不没无非别有在能会可以要想请问什怎哪几多少谁为啥何如果"
    "应该让给把被对向从到和与跟就才都也还又再很太真最更好差坏我你您他她它们这那个些每一其此"
    "建议希望增加支持功能改进优化添新期待退换赔投诉骗失望烂慢贵久帮查找推荐忙麻烦谢能否够"
    "呗嘿哎唉呵哈"
)
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(
    r"https?://\S+|www\.\S+|@\w+|["
    + _HAN
    + r"]|[a-z]+(?:'[a-z]+)*|[0-9]+(?:[.,][0-9]+)*|[?!]+|[.,;:~]"
)
# Style marks (see extract): negation, the writer's own thing, the reader addressed.
NEG_RE = re.compile(
    r"\b(?:not|no|never|nothing|nobody|none|nowhere|cannot)\b|n't\b|n’t\b"
    r"|(?<!有)没(?!有[^，。,.!?！？]{0,12}[吗？?])|不(?!错|客气|好意思|用|要紧|知道|了解)|未|无法"
)
MINE_RE = re.compile(r"\b(?:my|mine|our)\b|我的|我们的|我家")
YOU_RE = re.compile(r"\b(?:you|your|u|ur|yours)\b|你们|您|贵公司|贵司|客服")
# A narrative of what happened (past tense, perfect, 了/过) reports an experience.
PAST_RE = re.compile(
    r"\b(?:was|were|did|had|have been|has been|got|went|came|bought|ordered|paid|received|"
    r"sent|told|said|took|gave|left|broke)\b|[a-z]{3,}ed\b|[^\x00-\x7f]了|过了|[买用收到]过"
)
NENG_AFTER = frozenset("源力耗量效")
NENG_BEFORE = frozenset("性智功动节电体技才新势热核")
_MAX_TOKENS = 400  # long messages: the first 400 tokens decide
RULE_CLIP = 20.0  # rule cue sums above this add nothing more


def _norm_token(tok: str) -> str:
    """Return the normalised form of one raw token (see tokens)."""
    c = tok[0]
    if c.isdigit():
        return "0"
    if c == "@":
        return "@u"
    if tok.startswith(("http", "www.")) and len(tok) > 4 and ("/" in tok or "." in tok):
        return "<url>"
    if c in "?!":
        return "?" if "?" in tok else "!"  # "?!?" reads as a question
    if c in ".,;:~":
        return ","
    return tok


_TOKEN_MEMO: dict[str, str] = {}  # raw token -> _norm_token(raw token), bounded
MEMO_MAX = 1 << 17  # entries per memo before it is emptied (see IntentModel.predict_hits)


def tokens(text: str) -> list[str]:
    """Return the normalised tokens of `text`: lower case, NFKC, digits/URLs/handles masked."""
    low = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    raw = _TOKEN_RE.findall(low)[:_MAX_TOKENS]
    out = list(map(_TOKEN_MEMO.get, raw))
    if None in out:
        if len(_TOKEN_MEMO) > MEMO_MAX:
            _TOKEN_MEMO.clear()
        for i, tok in enumerate(raw):
            if out[i] is None:
                out[i] = _TOKEN_MEMO[tok] = _norm_token(tok)
    return out  # type: ignore[return-value]  # no None left


def _is_function(tok: str) -> bool:
    """Return True for tokens kept in the shape view."""
    if len(tok) == 1 and not tok.isascii():
        return tok in ZH_FUNCTION
    return tok in EN_FUNCTION or "'" in tok or tok in ("?", "!", ",", "0", "@u", "<url>")


def feature_hash(group: int, name: str) -> int:
    """Return the feature index of `name` in `group` (stable across processes)."""
    return (group << BITS) | (zlib.crc32(name.encode("utf-8")) & MASK)


FeatureList = list[tuple[int, float, str]]


def extract(text: str, hits: dict[str, tuple[str, float]], *, subject: str = "") -> FeatureList:
    """Return (index, value, name) for a message given its rule cue hits."""
    feats: FeatureList = [(feature_hash(G_RULE, "bias"), 1.0, "bias")]
    # -- rule group: the rule classifier's cue sums per label, and its verdict.
    sums = dict.fromkeys(LABELS, 0.0)
    for label, weight in hits.values():
        sums[label] += weight
    if hits:
        for label in LABELS:
            if sums[label]:
                name = f"rule:{label}"
                feats.append((feature_hash(G_RULE, name), min(sums[label], RULE_CLIP) / 4.0, name))
        logits = {k: PRIOR[k] + sums[k] for k in LABELS}
        best = max(LABELS, key=logits.__getitem__)
        second = max(v for k, v in logits.items() if k != best)
        margin = logits[best] - second
        name = f"rule-top:{best}"
        feats.append((feature_hash(G_RULE, name), 1.0, name))
        if margin >= 2.0:
            name = f"rule-sure:{best}"
            feats.append((feature_hash(G_RULE, name), 1.0, name))
    else:
        feats.append((feature_hash(G_RULE, "rule:none"), 1.0, "rule:none"))
    # -- style: language-free marks of how the message is put (a question, a
    # negation, the writer's own thing, the company addressed) and their pairs
    # with the rule verdicts. Chinese and English data both teach them, so they
    # carry to domains neither saw: a question that also complains ("why is my
    # X still not working?") is a grievance, a question alone an inquiry.
    low = text.lower() if not subject else f"{subject} {text}".lower()
    marks = []
    q = "?" in low or "？" in low
    if q:
        marks.append("q")
    if NEG_RE.search(low):
        marks.append("neg")
    if MINE_RE.search(low):
        marks.append("mine")
    if YOU_RE.search(low):
        marks.append("you")
    if PAST_RE.search(low):
        marks.append("past")
    for a, b in itertools.combinations(list(marks), 2):
        marks.append(f"{a}+{b}")
    if q and sums[LABELS[1]] >= 1.5:
        marks.append("q+complaint")
    if q and sums[LABELS[2]] >= 1.5:
        marks.append("q+suggestion")
    for mk in marks:
        name = "sty:" + mk
        feats.append((feature_hash(G_RULE, name), 1.0, name))
    # -- cue group
    for cue in hits:
        name = f"cue:{cue}"
        feats.append((feature_hash(G_CUE, name), 1.0, name))
    # -- shape and lexical groups
    toks = tokens(f"{subject} , {text}" if subject else text)
    if toks:
        shape: list[str] = ["^"]
        for i, tok in enumerate(toks):
            t = tok if _is_function(tok) else "X"
            if tok == "能" and (
                (i + 1 < len(toks) and toks[i + 1] in NENG_AFTER)
                or (i and toks[i - 1] in NENG_BEFORE)
            ):
                t = "X"  # 能 inside a noun (能源, 性能, 智能), not the modal "can"
            if t != "X" or shape[-1] != "X":
                shape.append(t)
        shape.append("$")
        names: set[str] = set()
        for n in (1, 2, 3):
            for i in range(len(shape) - n + 1):
                gram = shape[i : i + n]
                if all(t in ("^", "$", "X", ",") for t in gram):
                    continue  # pure register (length, punctuation-free titles), not intent
                names.add("shape:" + " ".join(gram))
        if names:
            v = 1.0 / math.sqrt(len(names))
            feats.extend((feature_hash(G_SHAPE, nm), v, nm) for nm in sorted(names))
        # Punctuation is register (titles have none), not intent: shape sees it.
        lex: set[str] = {t for t in toks if t != ","}
        lex.update(f"{a} {b}" for a, b in itertools.pairwise(toks))
        if lex:  # a text of commas alone has no words
            v = 1.0 / math.sqrt(len(lex))
            feats.extend((feature_hash(G_LEX, "lex:" + nm), v, "lex:" + nm) for nm in sorted(lex))
    return feats
