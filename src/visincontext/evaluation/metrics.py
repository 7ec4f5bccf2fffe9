"""Few-shot evaluation metrics: VQA accuracy (official normalisation), CIDEr-D and ANLS."""

import math
import re
from collections import Counter

# The VQA evaluation's answer normalisation (github.com/GT-Vision-Lab/VQA, vqaEval.py), written anew.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer processing: punctuation, periods, number words, articles, contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    original, text = answer, answer
    for p in _PUNCTUATION:  # removed when next to a space (or with a number comma anywhere), else a space
        if (p + " " in original or " " + p in original) or _COMMA_STRIP.search(original) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy as the official evaluation computes it: min(#other annotators with the answer / 3, 1),
    averaged over the leave-one-annotator-out subsets. As in the official code, answers are normalised
    only when the annotators disagree (otherwise only newlines/tabs are replaced and ends stripped). With a
    single reference the score is the normalised exact match."""
    if not references:
        raise ValueError("references: expected at least one reference answer")
    clean = lambda a: a.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    prediction, references = clean(prediction), [clean(r) for r in references]
    if len(references) == 1:  # one reference (e.g. easy-VQA): normalised exact match
        return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(references[0]))
    if len(set(references)) > 1:
        prediction = normalize_vqa_answer(prediction)
        references = [normalize_vqa_answer(r) for r in references]
    scores = []
    for left_out in range(len(references)):
        others = references[:left_out] + references[left_out + 1 :]
        scores.append(min(sum(r == prediction for r in others) / 3.0, 1.0))
    return sum(scores) / len(scores)


def _ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.lower().split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: dict, references: dict, n: int = 4, sigma: float = 6.0) -> tuple[float, dict]:
    """CIDEr-D (Vedantam et al., 2015, as in the COCO caption evaluation): tf-idf n-gram vectors (n = 1..4)
    with document frequencies over the references, clipped candidate counts, a Gaussian length penalty
    (sigma 6), averaged over references and n, times 10. `predictions`: id -> caption, `references`: id ->
    list of captions (already tokenised: lower-cased, space-separated). Returns (corpus score, per id)."""
    if set(predictions) != set(references):
        raise ValueError("predictions: expected the same ids as references")
    ids = sorted(references)
    reference_counts = {i: [_ngrams(r, n) for r in references[i]] for i in ids}
    document_frequency = Counter()
    for i in ids:
        document_frequency.update({gram for counts in reference_counts[i] for gram in counts})
    log_documents = math.log(float(len(ids)))

    def vector(counts: Counter):
        vec, norms, length = [{} for _ in range(n)], [0.0] * n, 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = tf * (log_documents - math.log(max(1.0, document_frequency[gram])))
            vec[k][gram] = weight
            norms[k] += weight**2
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norms], length

    def similarity(hyp, ref):
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        delta = float(len_h - len_r)
        values = []
        for k in range(n):
            dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            value = dot / (norm_h[k] * norm_r[k]) if norm_h[k] and norm_r[k] else 0.0
            values.append(value * math.e ** (-(delta**2) / (2 * sigma**2)))
        return values

    per_id = {}
    for i in ids:
        hyp = vector(_ngrams(predictions[i], n))
        totals = [0.0] * n
        for ref_counts in reference_counts[i]:
            for k, value in enumerate(similarity(hyp, vector(ref_counts))):
                totals[k] += value
        per_id[i] = 10.0 * sum(totals) / n / len(reference_counts[i])
    return sum(per_id.values()) / len(per_id), per_id


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (Biten et al., 2019): the best over the
    references of 1 - edit distance / longer length (case-insensitive, stripped), 0 below `threshold`."""
    if not references:
        raise ValueError("references: expected at least one reference answer")
    best = 0.0
    for reference in references:
        a, b = prediction.strip().lower(), reference.strip().lower()
        length = max(len(a), len(b))
        similarity = 1.0 - _levenshtein(a, b) / length if length else 1.0
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best
