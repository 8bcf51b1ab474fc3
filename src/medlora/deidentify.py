"""Regex scrubber for personal identifiers in clinical free text (`medlora prepare --deidentify`).

Each match is replaced by a typed placeholder and counted:

    [EMAIL]      a.patient@example.com
    [RECORD_ID]  the number after MRN / UHID / Patient ID / IP No. / Reg. No. / CR No. ... (label kept)
    [DOB]        a date after DOB / D.O.B. / date of birth / born on (label kept)
    [PHONE]      +CC numbers, US (555) 123-4567 / 555-123-4567, Indian mobiles 98765 43210 / +91-9876543210
    [ADDRESS]    [Flat 4B,] house number + capitalised street name + suffix (Street, Rd, Nagar, Marg, ...)
    [NAME]       1-3 capitalised words after Mr/Mrs/Ms/Miss/Dr/Prof/Shri/Smt/Sri/Master (title kept:
                 "Dr. Anil Kumar" -> "Dr. [NAME]")

The rules run in that order (an e-mail holds digits a phone rule could take; an MRN can look like a
mobile number; "22 Dr Ambedkar Road" is an address, not a doctor). Ordinary medical numbers are left
alone: blood pressures (120/80 mmHg), doses, pH, lab values, percentages, years ("in 1998"), ages
("45-year-old"), and a bare "Dr" with no capitalised name after it. Scrubbing is idempotent.

Limits, plainly:
- It is a handful of regular expressions for English text and English/Indian formats. Anything
  written differently (other languages, other date or phone layouts, numbers spelled out, typos,
  identifiers split across lines) is missed.
- Names are found only after a title. A free-text name ("Ramesh was admitted"), a name without a
  title, or a name in lower case is NOT removed. Nor are cities, PIN/ZIP codes, hospital names,
  ages over 89, other dates (admission, discharge), or any of the other HIPAA identifiers that have
  no rule here.
- It can also replace text that is not an identifier (e.g. an eponym after "Dr.").
- It is a convenience for data you already handle under the proper rules, NOT a substitute for a
  reviewed de-identification process (HIPAA Safe Harbor or expert determination, or your
  jurisdiction's equivalent). Check the output before sharing it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, NamedTuple

TEXT_FIELDS = ("question", "opa", "opb", "opc", "opd", "exp")
TYPES = ("EMAIL", "RECORD_ID", "DOB", "PHONE", "ADDRESS", "NAME")  # also the order the rules run in

# Digits must not continue a longer number, word, decimal, ratio or range on either side.
_NUM_START = r"(?<![\w/.,+-])"
_NUM_END = r"(?![\w/%]|[.,-]\d)"

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DATE = (
    r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})"               # 12/03/1985, 12-03-85, 12.03.1985
    r"|\d{4}[/.-]\d{1,2}[/.-]\d{1,2}"                           # 1985-03-12
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}"  # 12 March 1985, 12th of Mar. 1985
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"          # March 12, 1985
)

_TITLE = r"\b(?:Mrs|Mr|Ms|Miss|Dr|Prof|Shri|Smt|Sri|Master)\b\.?"
# Capitalised words that start a sentence or a place, not a name ("... the Dr. The patient", "Sri Lanka").
_NOT_NAMES = ("And", "Are", "As", "At", "But", "By", "During", "For", "From", "He", "Her", "His", "How", "If", "In",
              "Is", "It", "Its", "Lanka", "Lankan", "Of", "On", "Or", "She", "So", "That", "The", "Their", "Then",
              "There", "These", "They", "This", "To", "Was", "We", "Were", "What", "When", "Where", "Which", "Who",
              "Why", "With")
# Anil, D'Souza, McKay, Rao-Patil, or an initial "A."
_NAME_WORD = rf"(?!(?:{'|'.join(_NOT_NAMES)})\b)(?:(?:[A-Z]'|Mc)?[A-Z][a-z]+(?:-[A-Z][a-z]+)?|[A-Z]\.)"

_STREET_SUFFIX = (r"(?:(?:Street|Road|Avenue|Lane|Nagar|Marg|Boulevard|Drive|Colony|Layout|Cross|Gali)\b"
                  r"|(?:St|Rd|Ave|Ln|Blvd)\b\.?)")

_RECORD_LABEL = (
    r"\b(?:(?:MRN|UHID)\b\.?(?:\s*(?:No\b\.?|Number\b|\#))?"  # these two stand alone
    r"|(?:CR|IPD?|OPD|Patient|Hospital|Medical\s+Record|Record|Reg(?:istration)?|Case)\b\.?\s*"  # these need
    r"(?:(?:ID|No|Number|Num)\b\.?|\#))"                                                      # ID / No / #
)


class Rule(NamedTuple):
    label: str  # the placeholder is f"[{label}]"
    pattern: re.Pattern  # group `pii` is replaced; group `keep` (a title or label before it), if any, is kept
    digits: tuple[int, int] | None = None  # a match with fewer or more digits is left alone


RULES = [
    Rule("EMAIL", re.compile(r"(?P<pii>\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b)")),
    Rule("RECORD_ID", re.compile(
        rf"(?P<keep>{_RECORD_LABEL}\s*(?:[:#-]\s*)?)(?P<pii>(?:[A-Z]{{1,4}}[/-]?)?\d[\d/-]*\d){_NUM_END}",
        re.IGNORECASE), digits=(3, 20)),
    Rule("DOB", re.compile(
        r"(?P<keep>\b(?:D\.?O\.?B\b\.?|date\s+of\s+birth|birth\s*date|born\s+on)\s*(?:[:-]\s*|(?:is|was)\s+)?)"
        rf"(?P<pii>{_DATE}){_NUM_END}", re.IGNORECASE)),
    Rule("PHONE", re.compile(
        rf"{_NUM_START}(?P<pii>"
        r"\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{2,5}(?:[\s.-]?\d{2,5}){0,3}"  # +44 20 7946 0958, +91-9876543210
        r"|(?:1[\s.-])?\(\d{3}\)\s?\d{3}[\s.-]\d{4}"                            # (555) 123-4567
        r"|(?:1[.-])?\d{3}[.-]\d{3}[.-]\d{4}"                                   # 555-123-4567, 1-800-555-0199
        r"|0?[6-9]\d{4}[\s-]?\d{5}"                                             # 98765 43210, 09876543210
        rf"){_NUM_END}"), digits=(10, 15)),
    Rule("ADDRESS", re.compile(
        r"(?P<pii>(?:\b(?:Flat|Apt|Apartment|House|Door|Plot|Unit)\.?\s*(?:No\.?\s*)?[\w/-]+,\s*)?"  # Flat 4B,
        rf"{_NUM_START}\d{{1,5}}[A-Za-z]?(?:[/-]\d{{1,4}}[A-Za-z]?)?,?\s+"                        # 22, 221B, 12/3
        rf"(?:(?:[A-Z][A-Za-z'.-]*|of)\s+){{1,4}}{_STREET_SUFFIX})")),                              # Linking Road
    Rule("NAME", re.compile(rf"(?P<keep>{_TITLE}\s+)(?P<pii>{_NAME_WORD}(?:\s+{_NAME_WORD}){{0,2}})(?!\w)")),
]
assert tuple(rule.label for rule in RULES) == TYPES


def deidentify_text(text: str) -> tuple[str, Counter]:
    """`text` with identifiers replaced by typed placeholders, and how many of each type were replaced."""
    counts: Counter = Counter()
    for rule in RULES:
        def replace(match: re.Match, rule: Rule = rule) -> str:
            if rule.digits and not rule.digits[0] <= sum(ch.isdigit() for ch in match["pii"]) <= rule.digits[1]:
                return match[0]
            counts[rule.label] += 1
            return (match.groupdict().get("keep") or "") + f"[{rule.label}]"

        text = rule.pattern.sub(replace, text)
    return text, counts


def deidentify_row(row: dict[str, Any], fields: Iterable[str] = TEXT_FIELDS) -> tuple[dict[str, Any], Counter]:
    """A copy of `row` with its string `fields` scrubbed; other fields, None and non-strings untouched."""
    out, counts = dict(row), Counter()
    for name in fields:
        value = out.get(name)
        if isinstance(value, str):
            out[name], found = deidentify_text(value)
            counts.update(found)
    return out, counts


def deidentify_value(value: Any) -> tuple[Any, Counter]:
    """Every string inside `value` (nested dicts and lists too) scrubbed: for rows written as they were read."""
    if isinstance(value, str):
        return deidentify_text(value)
    counts: Counter = Counter()
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out[key], found = deidentify_value(item)
            counts.update(found)
        return out, counts
    if isinstance(value, list):
        items = []
        for item in value:
            scrubbed, found = deidentify_value(item)
            items.append(scrubbed)
            counts.update(found)
        return items, counts
    return value, counts
