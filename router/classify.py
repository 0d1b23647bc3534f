"""The first message classifier: intent rules and lexicons for Chinese and English.

`RuleClassifier.classify` sorts a message into one of `router.model.LABELS`
(inquiry 咨询, complaint 投诉, suggestion 建议), finds escalation signals with the
evidence that raised them, and derives a severity from both (`severity_for`).

Label: every cue is a phrase that carries *intent* rather than topic (question
forms, grievance and redress language, proposal forms) and has a weight towards
one label. The weights of the cues found are summed per label on top of a small
prior (inquiry slightly ahead, so a message without any cue becomes a
low-confidence inquiry) and a softmax turns the sums into `scores`. `features`
names the strongest cues found, as "label:cue".

Signals: `safety`, `legal_threat`, `abuse`, `repeat_contact` (phrases in either
language), `amount_over_threshold` (money amounts at or above the threshold,
see `find_amounts`) and `vip` (the contact handle is in `vip_contacts`).

Spans: signal spans are character offsets into `text`. The optional `subject` is
scanned for label cues and for signals too, but a signal found only in the
subject has no span (`start == end == -1`): offsets into the subject would be
misread as offsets into the text.

Speed: all patterns are compiled at import. The literal cues of each language
form one trie-shaped regular expression without groups, so CPython's `re` can
skip to candidate characters (groups inside a large alternation would make the
scan ~50x slower); the matched phrase is then looked up in a dict. English
phrases are only tried where a word starts. A 200-character message takes a few
tens of microseconds; `bench/classify_rules_eval.py` measures it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from router.model import LABELS, Classification, Signal

MODEL_VERSION = "rules-1"

INQUIRY, COMPLAINT, SUGGESTION = LABELS

# With no cue at all softmax(0.3, 0, -0.2) gives inquiry ~0.43: "probably someone
# asking something, but unsure". Suggestions need an explicit proposal cue.
_PRIOR: dict[str, float] = {INQUIRY: 0.3, COMPLAINT: 0.0, SUGGESTION: -0.2}
_MAX_FEATURES = 5
PRIOR = _PRIOR  # public: router.intent builds rule-score features from it
_BLOCK = ""  # label of a blocker phrase, see _CueRows

# A cue table row: (label, weight, "phrase|phrase|..."). Phrases are lower case.
# A blocker row (label _BLOCK) lists longer phrases matched only so that the
# shorter cue inside them is not: 差不多 hides 差, 没问题 hides 问题. At each
# position the longest listed phrase wins.
_CueRows = tuple[tuple[str, float, str], ...]

_ZH_CUES: _CueRows = (
    # -- inquiry: question forms and requests for information or help --------
    (INQUIRY, 2.5, "请问|请教|咨询一下|想咨询|我想咨询|问一下|问问"),
    (
        INQUIRY,
        2.0,
        "吗|想了解|想知道|想问|请告诉|告诉我|请帮我|请帮忙|帮我查|帮我找|帮忙查|帮我推荐|"
        "给我推荐|帮我看看|查一下|查询|如何|怎样|怎么办|怎么样|能否告诉|可以告诉|有没有|是否|"
        "是不是|多少|多久|多长时间|什么时候|哪里|哪儿|哪些|哪个|哪家|哪一|哪位|几点|几号|"
        "好不好|行不行|对不对",
    ),
    (INQUIRY, 1.5, "？|?|什么|想找|我想找|我要找|推荐一|麻烦你|麻烦您"),
    (INQUIRY, 1.0, "怎么|呢|推荐|找一家|找一个|办理|了解一下|帮我|帮我们|发给我|发我|给我|找个"),
    # Traditional-script forms of the commonest question cues (HK/TW customers).
    (INQUIRY, 2.0, "嗎|請問|什麼|甚麼|怎麼|哪裡"),
    (INQUIRY, 0.4, "请"),
    # -- complaint: grievance, failure, demand for redress --------------------
    (COMPLAINT, 3.0, "投诉|举报|维权|凭什么|谁买谁后悔"),
    (
        COMPLAINT,
        2.5,
        # Grievance, deceit, bad attitude, refusal to fix.
        "太差|很差|极差|真差|差劲|差评|失望|垃圾|骗子|骗人|欺骗|被骗|骗|上当|忽悠|坑人|坑爹|"
        "黑心|无良|奸商|假货|虚假|欺诈|霸王条款|态度恶劣|态度差|态度很差|态度不好|恶劣|"
        "质量问题|不予|不解决|未解决|没解决|没有解决|不给解决|无法解决|推诿|推脱|踢皮球|敷衍|"
        "不负责|不作为|未兑现|不兑现|不符",
    ),
    (
        COMPLAINT,
        2.0,
        # Redress; still unresolved or ignored; feelings about the purchase.
        "退款|退货|退钱|退换|赔偿|索赔|赔钱|补偿|说法|至今|迄今|到现在还|到现在都|一直没|"
        "一直未|一直不|始终没|始终未|迟迟|拒绝|不理|不理睬|没人管|没人理|不管|不回复|没回复|"
        "拖延|一拖再拖|后悔|恶心|气人|气死|生气|愤怒|郁闷|无语|不满|糟糕|崩溃|无奈|闹心|心寒|"
        "不值|不推荐|别买|不要买|千万不要|千万别|奉劝|缺点|怎么回事|怎么这么|什么破|什么鬼|不爽|"
        "不咋地|不咋滴|劣质|鸡肋|可恶|丢脸|痛苦|没用|没什么用|拿错|发错|漏发|少发|错了|"
        "联系不上|打不通|找不到|查不到|收不到|打不开|上不了|连不上|"
        # Rhetorical questions that carry a grievance ("怎么还没到货？").
        "怎么还|怎么又|为什么不|为什么没|为什么要|还没到|还没有|？？|??|什么东西|什么玩意|"
        "搞什么|什么烂|合理的解释|说好的|请尽快|尽快处理|尽快解决|慎重|慎买|谨慎|难喝|醉了|"
        # Traditional-script grievance words.
        "投訴|騙|退貨|退錢|賠償|態度|壞了|質量|問題",
    ),
    (
        COMPLAINT,
        1.5,
        # Failure language that applies to any product or service, and negative
        # judgements.
        "故障|坏了|损坏|失灵|异响|异味|漏水|漏油|渗漏|生锈|锈蚀|开裂|破损|破了|断裂|脱落|"
        "变形|死机|黑屏|花屏|蓝屏|卡顿|闪退|掉线|无法|不能用|用不了|没法用|不好用|不工作|"
        "不灵敏|不灵|不稳定|不准|报错|出错|缺陷|瑕疵|隐患|毛病|严重|太慢|很慢|不好|不太好|"
        "不行|不怎么样|太贵|太小|太少|太薄|太吵|太脏|太麻烦|不方便|难吃|难用|难闻|难看|难受|"
        "刺鼻|居然|竟然|根本|简直|可惜|！！|抖动|晃动|异常|困难|进水|堵塞|丢失|无故|过大|"
        "噪音|频繁|老化|影响|平庸|烂|不喜欢|缺了|缺少|就这|我的天|说好|毫无|偏高",
    ),
    (
        COMPLAINT,
        1.0,
        "问题|坏|差|慢|脏|吵|麻烦|一般|不足|难道|不能|不支持|错误|太大|还是|却|漏|掉|未|现象|"
        "没什么|不敢|唉|晕|呵呵|希望不要|希望别|缩水|太高|偏贵|假的|掉漆|引起注意|引起重视",
    ),
    (COMPLAINT, 0.8, "不上|不到|不了"),
    (COMPLAINT, 0.5, "！|!|没有|不会|不"),
    # -- suggestion: proposals to improve something --------------------------
    (
        SUGGESTION,
        3.0,
        "建议|提议|希望增加|希望添加|希望支持|希望提供|希望加入|希望优化|希望改进|希望改善|"
        "希望完善|希望新增|希望开放|希望推出|希望引入|希望出|希望有|希望加|能否增加|能否添加|"
        "能否支持|能否加|可否增加|可否添加|可否支持|能不能增加|能不能添加|能不能加|能不能支持|"
        "可以增加|可以添加|可以加|可以支持|是否可以增加|是否可以添加|是否可以支持|是否能增加|"
        "是否能支持|考虑增加|考虑添加|考虑支持|考虑加入|请考虑|可以考虑|就好了|会更好|更好了|"
        "就更好",
    ),
    (
        SUGGESTION,
        2.0,
        "希望能|希望可以|希望能够|希望把|希望将|希望给|希望对|希望后续|希望以后|希望未来|"
        "希望早日|希望官方|最好能|最好可以|最好是|最好有|要是能|如果能|如果可以|更方便|改进|"
        "改善|优化|完善|增加|添加|新增|期待",
    ),
    (SUGGESTION, 1.0, "希望|支持|选项|应该|应当|期望|加入|允许|自定义"),
    (SUGGESTION, 3.0, "建議|優化|改進|增加選項"),
    (SUGGESTION, 0.5, "提供|设置|模式|开关|功能"),
    (
        _BLOCK,
        0.0,
        "差不多|差点|相差|没问题|没有问题|不错|不客气|贵公司|贵司|不一般|不管是|应该是|不用|"
        "不要紧|不好意思|一般来说|有什么建议|什么建议|希望是|参考建议",
    ),
)

_EN_CUES: _CueRows = (
    # -- inquiry ----------------------------------------------------------
    (
        INQUIRY,
        2.0,
        "how do i|how can i|how do you|how to|how much|how many|how long|how soon|how does|"
        "how would i|how will|what is|what's|whats|what are|what do|what does|what kind|"
        "what type|what time|where can|where do|where is|where are|when will|when can|when do|"
        "when does|when is|is there|are there|can i|could i|may i|do you|does it|do i|will i|"
        "would i|am i|should i|want to know|like to know|need to know|wondering|i wonder|"
        "tell me|show me|let me know|information about|information on|info about|info on|"
        "details about|details on|find out|please advise|inform me|enquire|inquire|inquiry|"
        "enquiry|any idea|anyone know|does anyone|is it possible|i would like to know|"
        "i'd like to know|i would like to ask|i'd like to ask|i would like to check|"
        "i'd like to check|i would like to find|i would like to see|i would like to view",
    ),
    (INQUIRY, 1.5, "check|track|explain|question"),
    (INQUIRY, 1.0, "what|how|where|is it|are you|can you|could you|help"),
    (INQUIRY, 0.6, "see my|view|know"),
    (INQUIRY, 0.3, "when|which"),
    (
        INQUIRY,
        1.0,
        "let us know|i need help|need help|need assistance|assistance|can't find|cannot find|"
        "can not find|can't see",
    ),
    # -- complaint ----------------------------------------------------------
    (
        COMPLAINT,
        5.0,
        # Asking to file a complaint is a complaint, even when shaped as a question.
        "complaint|complaints|complain|complaining|complained|reclamation|claim against|"
        "thanks for nothing|thanks for not|thank you for not",
    ),
    (
        COMPLAINT,
        2.5,
        "not happy|not satisfied|not pleased|unhappy|dissatisfied|discontent|disappointed|"
        "disappointing|disappointment|frustrated|frustrating|frustration|furious|angry|annoyed|"
        "annoying|upset|fed up|sick of|tired of|unacceptable|ridiculous|pathetic|disgusting|"
        "disgraceful|disgrace|appalling|outrageous|shameful|terrible|horrible|awful|worst|"
        "useless|rubbish|garbage|crap|sucks|scam|fraud|ripoff|rip off|ripped off|lied|liar|"
        "thieves|incompetent|rude|hate|don't like|dont like|do not like|wtf|overcharged|"
        "double charged|charged twice|never received|never arrived|never got|haven't received|"
        "have not received|hasn't arrived|has not arrived|didn't receive|did not receive|"
        "still not|still no|still haven't|still hasn't|still waiting|still can't|still don't|"
        "still doesn't|still broken|still nothing|suck|not good|unimpressed|let down|"
        "wish i had|wish i hadn't|wish i never|been waiting|already contacted|already called|"
        "already sent|already paid|why are you not|why is it not|why isn't|why aren't|why can't i",
    ),
    (
        COMPLAINT,
        2.0,
        "against your|against ur|no response|no reply|no answer|no one|nobody|noone|ignored|"
        "ignoring|on hold|waited|my money back|compensation|compensate|demand|fix it|fix this|"
        "get it fixed|sort it out|sort this out|shame|poor|lousy|fail|broken|damaged|"
        "doesn't work|does not work|not working|isn't working|stopped working|smh|ugh|"
        "supposed to|should have|should've|yet to|how come|unable to|don't work|do not work|"
        "didn't work|did not work|confusing|charging me|charged me|broke|haven't heard|"
        "have not heard|not heard|what gives|what the heck|what the hell|the hell|messed up|"
        "shocking|nothappy|coming apart|fell apart|falling apart|abusing|abusive|harassing|"
        "want a refund|want my refund|demand a refund|full refund|refund me|refund my",
    ),
    (
        COMPLAINT,
        1.5,
        "bad|wrong|delayed|missing|lost|expired|seriously|come on|again|every time|keeps|"
        "keep getting|never|error|failed|crashed|crashes|outage|late|why can't|why is|no longer|"
        "disappeared|stuck|take action|fault|failure|"
        "why does|why do|why would|why won't|paid for|joke",
    ),
    (
        COMPLAINT,
        1.0,
        "still|won't|couldn't|problem|problems|issue|issues|cancelled|canceled|why|waiting|"
        "customer service|weeks|can't|cannot|hours|days|doesn't|does not|fuck|fucking|shit|fix|"
        "scared|awkward|weird|out of stock",
    ),
    (COMPLAINT, 0.8, "didn't|isn't|wasn't|weren't|hasn't|haven't|hadn't|won't even|at all"),
    # Public grievance as customers write it to a company's account or inbox:
    # something that stopped working, waiting and chasing, sarcasm, swearing off
    # the company, and rhetorical questions ("how hard is it to …?").
    (
        COMPLAINT,
        2.5,
        "won't turn on|wont turn on|doesn't turn on|does not turn on|won't start|won't load|"
        "won't work|wont work|not loading|keeps crashing|keeps freezing|keeps dropping|"
        "keeps failing|keeps cutting|keeps happening|defective|faulty|is down|are down|went down|"
        "been down|no signal|no service|no internet|no power|no wifi|no connection|worse|"
        "never again|never buying|never using|never ordering|never shopping|never flying|"
        "never recommend|will never|not recommend|waste of|wasted|took forever|taking forever|"
        "takes forever|how hard is it|how difficult is it|how is it that|"
        "how is this acceptable|how is this possible|how is this fair|"
        "how many more|how much longer|what is going on|what's going on|whats going on|"
        "is this a joke|are you kidding|are you serious|you had one job|no excuse|"
        "every single time|yet again|once again|for the second time|for the third time|"
        "why is my|why does my|why won't my|why do i have to|why do i keep|why do you keep|"
        "why does it keep|why should i|not letting me|won't let me|doesn't let me|"
        "not even|didn't even|#fail|epic fail|so much for|poor service|bad service|"
        "customer service is|service is terrible|no help|not helpful|unhelpful|"
        "not acceptable|not ok|not okay|not fair|unfair|cheated|misled|misleading|"
        "false advertising|overpriced|unreliable|hung up|cut off|still charging|not impressed|"
        "shambles|appalled|gutted|livid|fuming|pissed|pissed off|raging",
    ),
    (
        COMPLAINT,
        2.0,
        # How long it has been going on: the wait is the grievance.
        "for days|for weeks|for hours|for months|all day|all week|all night|since yesterday|"
        "since last|days now|weeks now|hours now|days later|weeks later|hours later",
    ),
    (
        COMPLAINT,
        1.5,
        "great job|well done|nice job|good job|way to go|love how|gotta love|thanks a bunch|"
        "so slow|too slow|very slow|really slow|slow|forever|delay|delays|impossible|"
        "cancelled my|canceled my|lost my|ruined|mess|nightmare|hassle|headache|"
        "seriously?|really?|again?|sigh|dead|died|dies|freezes|froze|glitch|glitchy|"
        "lagging|laggy|dropped|drops|not received|not arrived|not delivered|never came",
    ),
    (COMPLAINT, 1.5, "claim|lodge|file a"),
    (
        COMPLAINT,
        0.5,
        "refund|aren't",
    ),
    # -- suggestion -----------------------------------------------------------
    (
        SUGGESTION,
        3.5,
        "would be nice|would be great|would be good|would be helpful|would be useful|"
        "would be better|would be awesome|would be cool|would be ideal|would be handy|"
        "would be wonderful|would be amazing|would be fantastic|would be excellent|"
        "would be beneficial|would be a good|would be a great|would be a nice|would be really|"
        "would be very|would be so|it would help|would like to see|i'd like to see|would love|"
        "i'd love|suggest|suggests|suggesting|suggested|suggestion|suggestions|propose|proposing|"
        "proposal|feature request|please add|"
        "please allow|please make|please include|please provide|please support|please consider|"
        "please enable|please implement|please bring|please introduce|please create|"
        "please offer|please give us|please let us|please let users|please improve|"
        "consider adding|consider making|consider allowing|consider supporting|nice to have|"
        "i wish|there should be|there needs to be|should be able|should allow|should support|"
        "should be|should have an|should have a|could you add|can you add|can we have|"
        "can we get|how about|ideally|enhancement|would also be|be very helpful|be very useful|"
        "be really helpful|be really useful|be helpful|be useful|be great|be nice|"
        "please expand|please upgrade|please extend|please bring back",
    ),
    (
        SUGGESTION,
        2.5,
        "should|shouldn't|should not|would help|would make|it'd be|wish|recommend|why not|"
        "needs to be|need to be|"
        "option to|an option|ability to|support for|allow users|allow the user|let users|"
        "let the user|it would|could we|good idea|great idea|we need|"
        "would be|let us|hope that|a way to|possibility to|the ability|be able to",
    ),
    (
        SUGGESTION,
        1.5,
        "add|adding|allow|allowing|implement|feature|features|improve|improvement|improvements|"
        "enhance|must|needs to|what about|could be|option|optional|configurable|"
        "customizable|customize|integrate|integration|maybe|perhaps|idea|better|alternatively|"
        "hoping|hope",
    ),
    (
        SUGGESTION,
        1.0,
        "support|supporting|enable|provide|expose|make it|users|i would like|i'd like|instead|"
        "instead of",
    ),
    (SUGGESTION, 0.5, "would|more|new|settings|setting"),
    (
        _BLOCK,
        0.0,
        # "support" the department is not "support" the proposal verb.
        "no problem|not a problem|no issue|no worries|not bad|thank you|customer support|"
        "tech support|technical support|support team|support ticket|support staff|support agent|"
        "support desk|support line|your support|contacted support|contact support|called support",
    ),
)

# Punctuation cues for Latin-script text, tested with `in` (they need no word
# boundary, and `in` costs next to nothing). Chinese text has them in _ZH_CUES.
_EN_MARKS: tuple[tuple[str, float, str], ...] = (
    (INQUIRY, 1.5, "?"),
    (COMPLAINT, 1.5, "!!"),
    (COMPLAINT, 0.5, "!"),
    (COMPLAINT, 2.0, ":("),
)

# The few cues that need a real pattern. (feature name, label, weight, pattern)
_PatternCues = tuple[tuple[str, str, float, re.Pattern[str]], ...]
_REDRESS_VERBS = "处理|解决|退|赔|换|维修|修复|质保|保修|召回|答复|说法|给予"
_ZH_PATTERN_CUES: _PatternCues = (
    # 希望 + a fix/refund verb demands redress ("希望厂家尽快处理"), it is not a
    # proposal; the weight outbids the 希望能 suggestion cue it overlaps.
    (
        "希望…处理",
        COMPLAINT,
        4.0,
        re.compile(rf"希望[^，。,.!?！？；;]{{0,8}}?(?:{_REDRESS_VERBS}|重视|尽快|负责)"),
    ),
    (
        "要求…处理",
        COMPLAINT,
        3.0,
        re.compile(rf"要求[^，。,.!?！？；;]{{0,8}}?(?:{_REDRESS_VERBS})"),
    ),
)
# A proposal verb opening a sentence ("Add dark mode.", "Allow export to CSV").
# "show me", "let me", "give me" ask for help instead, so they are excluded.
_IMPERATIVE_VERBS = (
    r"(?:please\s+)?(?:add|allow|support|include|provide|enable|implement|expose|introduce|"
    r"improve|display|offer|integrate|extend|expand|consider|make|create|show|let|give|remove|"
    r"disable|hide|rename|replace|unify|separate|increase|reduce|use|bring|change|update|warn|"
    r"detect|skip|export|import|sync|merge|split|upgrade|redesign|rework|simplify|restore)\b"
    r"(?! me\b)"
)
_IMPERATIVE_AT_START = re.compile(r"\s*" + _IMPERATIVE_VERBS)  # used with .match()
_IMPERATIVE_AFTER_STOP = re.compile(r"[.!;]\s+" + _IMPERATIVE_VERBS)
_IMPERATIVE_WEIGHT = 2.0

# Signals lend weight to the complaint label: a message that threatens to sue or
# reports an injury is a grievance even when phrased as a question.
_SIGNAL_CUES: dict[str, float] = {"legal_threat": 3.0, "abuse": 2.0, "safety": 1.5}

# -- escalation signal phrases ---------------------------------------------------
# Fragments are regexes that start with a plain literal character. Chinese ones
# match anywhere; English ones only where a word starts.


def _each(heads: Iterable[str], tail: str) -> list[str]:
    """Return one fragment per head, so every fragment starts with a literal."""
    return [head + tail for head in heads]


_THREE_OR_MORE = (
    r"(?:[3-9]|\d{2,}|three|four|five|six|seven|eight|nine|ten|several|multiple|many|"
    r"numerous|countless|so many|a dozen)"
)
_CONTACT_VERBS_EN = r"(?:contact|call|email|writ|messag|complain|reach|tweet|ask|chas|report)\w*"

_SIGNAL_FRAGMENTS: dict[str, tuple[list[str], list[str]]] = {
    # kind: (Chinese fragments, English fragments)
    "safety": (
        [
            *(
                "起火|着火|失火|火灾|冒烟|爆炸|爆燃|自燃|煤气泄[漏露]|"
                "燃气泄[漏露]|天然气泄[漏露]|煤气味|燃气味|一氧化碳|触电|电击|漏电|"
                "受伤|烫伤|烧伤|砸伤|割伤|摔伤|流血|骨折|中毒|窒息|昏迷|晕倒|自杀|"
                "轻生|不想活|跳楼|割腕|生命危险|人身安全|危及生命|身亡|伤亡"
            ).split("|"),
        ],
        [
            r"caught fire\b",
            r"on fire\b",
            r"catch(?:es|ing)? fire\b",
            r"fire broke out\b",
            r"set fire\b",
            r"burst into flames\b",
            r"in flames\b",
            r"smoke (?:coming|pouring)\b",
            r"sparking\b",
            r"sparks (?:coming|flying)\b",
            r"gas leak",
            r"leaking gas\b",
            r"smell(?:s|ed)? (?:of )?gas\b",
            r"carbon monoxide\b",
            r"explo(?:sion|ded|de)\b",
            r"blew up\b",
            r"electrocut\w*",
            r"electric(?:al)? shock\b",
            r"injur(?:ed|y|ies)\b",
            *_each(
                ("got", "get", "was", "were", "been", "is", "are"),
                r" (?:badly |seriously )?(?:hurt|burn(?:ed|t)|scalded)\b",
            ),
            r"hurt (?:myself|himself|herself|themselves)\b",
            r"bleeding\b",
            r"hospitali[sz]ed\b",
            *_each(
                ("taken", "rushed", "sent", "admitted", "ended up"),
                r" (?:to|in) (?:the )?hospital\b",
            ),
            r"suicid\w*",
            r"kill myself\b",
            r"end my life\b",
            r"want to die\b",
            r"poison(?:ed|ing)\b",
            r"unconscious\b",
            r"choking\b",
        ],
    ),
    "legal_threat": (
        [
            *"律师|起诉|上诉|诉讼|法院|法庭|仲裁".split("|"),
            r"12315(?!\d)",
            *(
                "消协|消费者协会|工商局|工商部门|市场监管局|市场监督管理局|打官司|"
                "法律途径|法律手段|法律责任"
            ).split("|"),
            # Plain 报警 also means a warning light going off (故障灯报警).
            *_each(("我要", "我会", "我就", "直接", "马上", "立即", "立刻"), "报警"),
        ],
        [
            r"12315(?!\d)",
            r"lawyers?\b",
            r"attorneys?\b",
            r"solicitors?\b",
            r"su(?:e|ing|ed)\b",
            r"lawsuits?\b",
            r"legal (?:action|proceedings|steps|advice|team)\b",
            r"litigation\b",
            r"small claims\b",
            r"class action\b",
            *_each(("take", "taking", "took"), r" (?:\w+ ){0,3}to court\b"),
            r"see you in court\b",
            r"court (?:case|action|order)\b",
            r"trading standards\b",
            r"ombudsman\b",
            r"better business bureau\b",
        ],
    ),
    "abuse": (
        [
            *(
                "傻逼|傻b|傻x|煞笔|沙比|操你|草你|艹你|日你|你妈的|你妈逼|草泥马|"
                "尼玛|去死|滚蛋|滚犊子|王八蛋|混蛋|狗东西|狗日|贱人|婊子|白痴|蠢货|"
                "蠢猪|脑残|智障"
            ).split("|"),
            # 废物 only when said of people ("你们这群废物"), not of a product.
            "你们?(?:这[群帮些]|都是|就是|是|真是|一群|一帮)?废物",
            *_each(("弄死", "杀了", "砍死", "打死", "宰了", "揍死", "收拾"), "你"),
            *"饶不了你|不会放过你|走着瞧|你等着".split("|"),
        ],
        [
            r"idiots?\b",
            r"morons?\b",
            r"imbeciles?\b",
            r"retard(?:s|ed)?\b",
            r"dumbass\b",
            r"you(?:'re| are| r) (?:an? |so |such an? |fucking )?(?:stupid|dumb|idiot|moron)",
            r"f[u*]c?k(?:ing)? (?:you|u|off)\b",
            r"f\*+(?:c?k)? (?:you|u|off)\b",
            r"screw you\b",
            r"go to hell\b",
            r"drop dead\b",
            r"go die\b",
            r"kill yourself\b",
            r"shut up\b",
            r"bitch(?:es)?\b",
            r"assholes?\b",
            r"arseholes?\b",
            r"bastards?\b",
            r"dickheads?\b",
            r"cunts?\b",
            r"i(?:'ll| will|'m going to| am going to|'m gonna| am gonna) "
            r"(?:kill|hurt|find|beat|shoot|stab|punch|destroy) (?:you|u|your)\b",
            r"kill you\b",
        ],
    ),
    "repeat_contact": (
        [
            r"第(?:[三四五六七八九十]+|[3-9]|\d{2,})次(?:联系|投诉|反映|打电话|来电|致电|找|催|咨询|"
            r"询问|提交|反馈|留言)",
            *_each(
                ("多次", "反复", "再三", "三番五次", "一再", "屡次", "好几次", "无数次"),
                "(?:联系|投诉|反映|打电话|致电|找客服|催|沟通|询问|反馈|来电|留言|咨询)",
            ),
            *_each(
                ("打了", "联系了", "投诉了", "反映了", "打过"),
                r"(?:[三四五六七八九十]|[3-9]|\d{2,}|好几|无数)(?:次|个电话|通电话)",
            ),
        ],
        [
            *_each(
                ("third", "fourth", "fifth", "sixth", "seventh", "tenth"),
                r" time (?:i(?:'ve| have)? )?" + _CONTACT_VERBS_EN,
            ),
            *_each(
                (
                    "contacted",
                    "called",
                    "emailed",
                    "messaged",
                    "phoned",
                    "rang",
                    "chased",
                    "tweeted",
                    "written to",
                    "wrote to",
                    "complained to",
                    "reached out to",
                ),
                r" (?:you |you guys |them |your \w+ |\w+ )?" + _THREE_OR_MORE + r" times\b",
            ),
            *_each(
                (
                    "three",
                    "four",
                    "five",
                    "six",
                    "seven",
                    "eight",
                    "nine",
                    "ten",
                    "several",
                    "multiple",
                    "numerous",
                    "countless",
                ),
                r" (?:calls|emails|e-mails|messages|tweets|complaints|tickets)\b",
            ),
        ],
    ),
}
# Digits first ("5 emails", "4th time I called") get their own pattern: a branch
# that starts with a character class would slow the shared scan down. The count
# is checked against _MIN_REPEATS in Python.
_REPEAT_DIGITS_RE = re.compile(
    r"([0-9]+)(?:(?:rd|th) time (?:i(?:'ve| have)? )?" + _CONTACT_VERBS_EN + r"|"
    r" (?:calls|emails|e-mails|messages|tweets|complaints|tickets)\b)"
)
_MIN_REPEATS = 3  # the service standards escalate from the third contact on

# -- amounts --------------------------------------------------------------------
# A digit run is an amount only with a currency marker before or after it, or
# with a 万/千 multiplier that is not followed by a non-money unit ("5千" is
# money in speech, "5千公里" is a distance). Bare numbers (order ids, phones,
# dates, "order #600012") never are.
_DIGITS_RE = re.compile(r"[0-9０-９]+(?:,[0-9]{3})*(?:\.[0-9]+)?")
_CURRENCY_PREFIX_RE = re.compile(
    r"(?:us\$|hk\$|s\$|a\$|c\$|\$|¥|￥|€|£|(?<![a-z])(?:rmb|cny|usd|eur|gbp|hkd|jpy|aud|cad)\s?)\s?$"
)
_AMOUNT_TAIL_RE = re.compile(
    r"(?P<mult>千万|百万|万|千|百|亿|k(?![a-z])|m(?![a-z])|\s?(?:million|thousand|grand)(?![a-z]))?"
    r"(?P<more>多|余)?"
    r"\s?(?P<cur>块钱|元|块|圆|人民币|美元|美金|欧元|英镑|港币|港元|日元|"
    r"(?:yuan|rmb|cny|usd|dollars?|bucks|eur|euros?|gbp|pounds?|hkd|quid|kuai)(?![a-z]))?"
)
_NON_MONEY_UNIT_RE = re.compile(
    r"\s?(?:公里|千米|米|里|人|次|个|台|辆|件|条|字|步|小时|分钟|秒|天|年|月|日|号|公斤|斤|克|吨|"
    r"毫安|像素|粉丝|平|亩|度|张|页|本|瓶|盒|包|只|头|粒|份|名|位|户|家|座|间|套|株|棵|行|"
    r"km|kg|mah|mb|gb|fans)"
)
_BARE_MULTIPLIERS = frozenset({"万", "千", "百万", "千万", "亿"})
_CN_CURRENCY = "块钱|元|块|圆|人民币|美元|美金|欧元|英镑|港币|港元|日元"
_CN_AMOUNT_RE = re.compile(
    rf"[零〇一二两三四五六七八九十百千万亿壹贰叁肆伍陆柒捌玖拾佰仟]+(?:多|余)?(?:{_CN_CURRENCY})"
)
_CN_CURRENCY_CHARS = "元块圆币金镑"  # every word in _CN_CURRENCY holds one of these
_CN_CURRENCY_SUFFIX_RE = re.compile(rf"(?:多|余)?(?:{_CN_CURRENCY})$")
_MULTIPLIERS: dict[str, float] = {
    "百": 1e2,
    "千": 1e3,
    "万": 1e4,
    "百万": 1e6,
    "千万": 1e7,
    "亿": 1e8,
    "k": 1e3,
    "m": 1e6,
    "thousand": 1e3,
    "grand": 1e3,
    "million": 1e6,
}
_CN_DIGITS: dict[str, float] = dict(
    zip(
        "零〇一壹二两贰三叁四肆五伍六陆七柒八捌九玖",
        (0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9),
        strict=True,
    )
)
_CN_SMALL_UNITS: dict[str, float] = {
    "十": 10,
    "拾": 10,
    "百": 100,
    "佰": 100,
    "千": 1000,
    "仟": 1000,
}

# -- scripts ---------------------------------------------------------------------
_HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_LATIN_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_KANA_HANGUL_RE = re.compile(r"[\u3040-\u30ff\uac00-\ud7af]+")
_OTHER_LETTER_RE = re.compile(
    r"[^\W\d_A-Za-z\u00c0-\u024f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"
)
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")
_ZH_SHARE = 0.2  # mixed text with at least this share of Han letters is Chinese
_ASCII_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


@dataclass(frozen=True, slots=True)
class Amount:
    """A money amount found in text: its value in the stated currency and where it was."""

    value: float
    evidence: str
    start: int
    end: int


# -- compiling the tables ----------------------------------------------------------
_Trie = dict[str, "_Trie"]


def _trie_pattern(words: Iterable[str]) -> str:
    """Return a group-free regex matching any of `words`, preferring the longest."""
    root: _Trie = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # end-of-word marker

    def emit(node: _Trie) -> str:
        """Return the pattern for the words below one trie node."""
        branches = [re.escape(ch) + emit(child) for ch, child in node.items() if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Ending here is the fallback (`?` is greedy), so longer phrases win.
        return f"(?:{body})?" if "" in node else body

    return emit(root)


def _cue_table(rows: _CueRows) -> dict[str, tuple[str, str, float]]:
    """Return phrase -> (feature name, label, weight) for a cue table, refusing duplicates."""
    table: dict[str, tuple[str, str, float]] = {}
    for label, weight, phrases in rows:
        for phrase in phrases.split("|"):
            if phrase in table:
                raise ValueError(f"cue listed twice: {phrase!r}")
            table[phrase] = (f"{label}:{phrase}", label, weight)
    return table


def _grouped(fragments: Iterable[str]) -> str:
    """Return one alternation of literal-first fragments, one branch per first character."""
    by_first: dict[str, list[str]] = {}
    for fragment in fragments:
        # The first character must be a plain literal that no quantifier applies to.
        if fragment[0] in "\\[(.^$" or fragment[1:2] in ("?", "*", "+", "{"):
            raise ValueError(f"fragment must start with a literal: {fragment!r}")
        by_first.setdefault(fragment[0], []).append(fragment[1:])
    # At a candidate position the engine then takes the one branch whose first
    # character matches instead of trying every fragment in turn.
    return "|".join(re.escape(ch) + "(?:" + "|".join(rest) + ")" for ch, rest in by_first.items())


# English scans run over " " + text and start with one non-word character, so
# candidates are only word starts; the matched phrase is m.group()[1:].
_WORD_START = "[^a-z0-9']"

_ZH_TABLE = _cue_table(_ZH_CUES)
_EN_TABLE = _cue_table(_EN_CUES)
_ZH_SCAN = re.compile(_trie_pattern(_ZH_TABLE))
_EN_SCAN = re.compile(_WORD_START + "(?:" + _trie_pattern(_EN_TABLE) + ")(?![a-z0-9])")

_ZH_SIGNAL_SCAN = re.compile(_grouped(f for zh, _ in _SIGNAL_FRAGMENTS.values() for f in zh))
_EN_SIGNAL_SCAN = re.compile(
    _WORD_START + "(?:" + _grouped(f for _, en in _SIGNAL_FRAGMENTS.values() for f in en) + ")"
)
# Which kind a scan hit belongs to: the first whose own pattern matches it whole.
_SIGNAL_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile("|".join(zh + en))) for kind, (zh, en) in _SIGNAL_FRAGMENTS.items()
)


# -- functions -------------------------------------------------------------------
def _has_latin(text: str) -> bool:
    """Return True when `text` holds an ASCII letter."""
    # Dropping every non-ASCII character in C and comparing cases is ~10x faster
    # than a regex scan over a Chinese text that has no Latin letter at all.
    ascii_part = text.encode("ascii", "ignore")
    return ascii_part.lower() != ascii_part.upper()


def _lower(text: str) -> str:
    """Return `text` lower-cased with the same length, so offsets stay valid."""
    low = text.lower()
    if len(low) != len(text):
        # Rare: a character whose lower case is longer (U+0130). Lower per character.
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    if "\u2019" in low:
        # Typographic apostrophes, so "don’t" meets the "don't" cue. (replace, not
        # translate: str.translate is ~10x slower on non-ASCII text.)
        low = low.replace("\u2019", "'")
    return low


def detect_language(text: str) -> str:
    """Return "zh" when >= 20% of the letters are Han, "en" for mostly Latin, else "other"."""
    if text.isascii():
        return "en" if _ASCII_LETTER_RE.search(text) else "other"
    han = sum(map(len, _HAN_RE.findall(text)))
    # Japanese writes with Han characters too: more kana than Han is not Chinese.
    kana = sum(map(len, _KANA_HANGUL_RE.findall(text))) if han else 0
    if han and han >= _ZH_SHARE * len(text):
        # Han at >= 20% of all characters is >= 20% of the letters: skip counting.
        return "zh" if kana < han else "other"
    latin = sum(map(len, _LATIN_RE.findall(text)))
    other = sum(map(len, _OTHER_LETTER_RE.findall(text)))
    if han and han >= _ZH_SHARE * (han + latin + other):
        return "zh" if kana < han else "other"
    if latin and latin >= other:
        return "en"
    return "other"


def severity_for(label: str, signals: Sequence[Signal]) -> str:
    """Return P0-P3 for a label and its signals, by the table in this docstring.

    | first condition that holds                                         | severity |
    |--------------------------------------------------------------------|----------|
    | a `safety` signal (someone's life or health is at risk)            | P0       |
    | a `legal_threat` or `abuse` signal, whatever the label             | P1       |
    | complaint with `amount_over_threshold`, `vip` or `repeat_contact`  | P1       |
    | complaint                                                          | P2       |
    | other label with `amount_over_threshold`, `vip` or `repeat_contact`| P2       |
    | anything else                                                      | P3       |

    This follows the service standards: level 1 (P0) is personal safety; level 2
    (P1) is legal exposure, staff under threat, VIPs harmed and the automatic
    escalation triggers (repeat contact, large sums) on a complaint; level 3 (P2)
    is a routine complaint. Unknown signal kinds are ignored, so a new detector
    cannot raise severity by accident.
    """
    kinds = {s.kind for s in signals}
    if "safety" in kinds:
        return "P0"
    if "legal_threat" in kinds or "abuse" in kinds:
        return "P1"
    escalated = not kinds.isdisjoint(("amount_over_threshold", "vip", "repeat_contact"))
    if label == COMPLAINT:
        return "P1" if escalated else "P2"
    return "P2" if escalated else "P3"


def _parse_cn_number(s: str) -> float:
    """Return the value of a Chinese numeral such as 两万, 一千二百 or 一万五千."""
    total = section = digit = 0.0
    for ch in s:
        if ch in _CN_DIGITS:
            digit = _CN_DIGITS[ch]
        elif ch in _CN_SMALL_UNITS:
            # A bare unit counts one of it: 十五 is 15, 千元 is 1000.
            section += (digit or 1.0) * _CN_SMALL_UNITS[ch]
            digit = 0.0
        elif ch == "万":
            total += ((section + digit) or 1.0) * 1e4
            section = digit = 0.0
        elif ch == "亿":
            total = ((total + section + digit) or 1.0) * 1e8
            section = digit = 0.0
    return total + section + digit


def find_amounts(text: str) -> list[Amount]:
    """Return the money amounts stated in `text`, in order (see the rules at _DIGITS_RE)."""
    low = _lower(text)
    found: list[Amount] = []
    for m in _DIGITS_RE.finditer(low):
        start, end = m.span()
        # Digits glued to letters or '#' are an identifier (A1234, #600012). A '-'
        # may be a range ("5000-8000元"), so it does not disqualify.
        if start and (low[start - 1] in _ASCII_ALNUM or low[start - 1] in "#_/."):
            continue
        prefix = _CURRENCY_PREFIX_RE.search(low, max(0, start - 6), start)
        tail = _AMOUNT_TAIL_RE.match(low, end)
        if tail is None:  # cannot happen: every part of the tail is optional
            continue
        mult, currency = tail.group("mult"), tail.group("cur")
        if prefix is None and currency is None:
            if mult not in _BARE_MULTIPLIERS or _NON_MONEY_UNIT_RE.match(low, tail.end()):
                continue
        value = float(m.group().replace(",", ""))
        if mult:
            value *= _MULTIPLIERS[mult.strip()]
        first = prefix.start() if prefix else start
        # End at the last part present, not at a space the tail pattern tried.
        last = max(end, tail.end("mult"), tail.end("more"), tail.end("cur"))
        found.append(Amount(value, text[first:last], first, last))
    # Most texts hold no currency word at all; `in` is far cheaper than a scan.
    if not any(ch in text for ch in _CN_CURRENCY_CHARS):
        found.sort(key=lambda a: a.start)
        return found
    taken = [(a.start, a.end) for a in found]
    for m in _CN_AMOUNT_RE.finditer(text):
        if any(s <= m.start() < e for s, e in taken):
            continue  # the 万元 of "3万元", already read with its digits
        numeral = _CN_CURRENCY_SUFFIX_RE.sub("", m.group())
        found.append(Amount(_parse_cn_number(numeral), m.group(), m.start(), m.end()))
    found.sort(key=lambda a: a.start)
    return found


def _signals_in(text: str, low: str, has_han: bool, has_latin: bool) -> list[Signal]:
    """Return the phrase signals (safety, legal, abuse, repeat contact) with spans into text."""
    spans: list[tuple[int, int]] = []
    if has_han:
        spans.extend(m.span() for m in _ZH_SIGNAL_SCAN.finditer(low))
    if has_latin or "12315" in low:
        # Offsets in the padded string are one past the separator: start - 1 + 1.
        spans.extend((m.start(), m.end() - 1) for m in _EN_SIGNAL_SCAN.finditer(" " + low))
    out: list[Signal] = []
    seen: set[tuple[int, int]] = set()
    for start, end in sorted(spans):
        if (start, end) in seen:
            continue
        seen.add((start, end))
        phrase = low[start:end]
        for kind, pattern in _SIGNAL_KINDS:
            if pattern.fullmatch(phrase):
                out.append(Signal(kind, text[start:end], start, end))
                break
    for m in _REPEAT_DIGITS_RE.finditer(low) if has_latin else ():
        start, end = m.span()
        if not (start and low[start - 1] in _ASCII_ALNUM) and int(m.group(1)) >= _MIN_REPEATS:
            out.append(Signal("repeat_contact", text[start:end], start, end))
    return out


def _scan_cues(
    low: str, has_han: bool, has_latin: bool, hits: dict[str, tuple[str, float]]
) -> None:
    """Add the cues found in lower-cased `low` to `hits` (feature name -> (label, weight))."""
    if has_han:
        for m in _ZH_SCAN.finditer(low):
            name, label, weight = _ZH_TABLE[m.group()]
            if label:
                hits[name] = (label, weight)
        for name, label, weight, pattern in _ZH_PATTERN_CUES:
            if pattern.search(low):
                hits[f"{label}:{name}"] = (label, weight)
    if has_latin:
        for m in _EN_SCAN.finditer(" " + low):
            name, label, weight = _EN_TABLE[m.group()[1:]]
            if label:
                hits[name] = (label, weight)
        for label, weight, mark in _EN_MARKS:
            if mark in low:
                hits[f"{label}:{mark}"] = (label, weight)
        if _IMPERATIVE_AT_START.match(low) or _IMPERATIVE_AFTER_STOP.search(low):
            hits[f"{SUGGESTION}:imperative"] = (SUGGESTION, _IMPERATIVE_WEIGHT)


class RuleClassifier:
    """Label, score and flag messages with hand-written intent rules (zh and en)."""

    model_version: str = MODEL_VERSION

    def __init__(
        self, *, amount_threshold: float = 5000.0, vip_contacts: frozenset[str] = frozenset()
    ) -> None:
        """Keep the escalation amount (amounts >= it raise a signal) and the VIP handles."""
        self.amount_threshold = amount_threshold
        # Handles are compared trimmed and case-folded: channels report e-mail
        # addresses and chat handles in whatever case they were typed.
        self.vip_contacts = frozenset(c.strip().casefold() for c in vip_contacts)

    def signals(self, text: str, *, contact: str = "") -> list[Signal]:
        """Return the escalation signals in `text` (spans into it), plus `vip` for `contact`."""
        low = _lower(text)
        has_han = _HAN_RE.search(text) is not None
        has_latin = _has_latin(text)
        return self._signals(text, low, has_han, has_latin, contact)

    def _signals(
        self, text: str, low: str, has_han: bool, has_latin: bool, contact: str
    ) -> list[Signal]:
        """Return the signals of `text` given its lower-cased form and scripts."""
        out = _signals_in(text, low, has_han, has_latin)
        for amount in find_amounts(text):
            if amount.value >= self.amount_threshold:
                out.append(
                    Signal(
                        "amount_over_threshold",
                        amount.evidence,
                        amount.start,
                        amount.end,
                        amount.value,
                    )
                )
        if contact and contact.strip().casefold() in self.vip_contacts:
            out.append(Signal("vip", contact.strip()))
        return out

    def analyse(
        self, text: str, *, subject: str = "", contact: str = ""
    ) -> tuple[dict[str, tuple[str, float]], list[Signal]]:
        """Return the cue hits ("label:cue" -> (label, weight)) and the signals of a message.

        This is what `classify` scores; `router.intent` uses the hits as features.
        """
        low = _lower(text)
        has_han = _HAN_RE.search(text) is not None
        has_latin = _has_latin(text)
        hits: dict[str, tuple[str, float]] = {}
        _scan_cues(low, has_han, has_latin, hits)
        signals = self._signals(text, low, has_han, has_latin, contact)
        if subject:
            sub_low = _lower(subject)
            sub_han = _HAN_RE.search(subject) is not None
            sub_latin = _has_latin(subject)
            _scan_cues(sub_low, sub_han, sub_latin, hits)
            seen = {(s.kind, s.evidence) for s in signals}
            for s in self._signals(subject, sub_low, sub_han, sub_latin, ""):
                if (s.kind, s.evidence) not in seen:
                    # Found only in the subject: keep the evidence, drop the span.
                    signals.append(Signal(s.kind, s.evidence, value=s.value))
        for s in signals:
            weight = _SIGNAL_CUES.get(s.kind)
            if weight is not None:
                hits[f"{COMPLAINT}:signal:{s.kind}"] = (COMPLAINT, weight)
        return hits, signals

    def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification:
        """Return label, scores, severity and signals for a message (spans index `text`)."""
        hits, signals = self.analyse(text, subject=subject, contact=contact)
        logits = dict(_PRIOR)
        for cue_label, weight in hits.values():
            logits[cue_label] += weight
        top = max(logits.values())
        exp = {k: math.exp(v - top) for k, v in logits.items()}
        norm = sum(exp.values())
        scores = {k: exp[k] / norm for k in LABELS}
        # max() keeps the first of equal scores: ties go to inquiry, the safe default.
        label = max(LABELS, key=scores.__getitem__)
        ranked = sorted(hits.items(), key=lambda kv: -kv[1][1])[:_MAX_FEATURES]
        if language is None:
            language = detect_language(f"{subject}\n{text}" if subject else text)
        return Classification(
            label=label,
            confidence=scores[label],
            scores=scores,
            severity=severity_for(label, signals),
            signals=tuple(signals),
            language=language,
            model_version=self.model_version,
            features=tuple((name, weight) for name, (_, weight) in ranked),
        )
