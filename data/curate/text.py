"""Text helpers shared by the heuristic filters: words, sentence counts, punctuation sets, repeats.

Library module, no entry point; `data.curate.gopher`, `data.curate.c4` and `data.curate.fineweb` use it.
Words are spaCy's English tokens (`data.curate.en_words`, re-exported here); sentences are counted
as spaCy's rule-based sentencizer splits them; the punctuation sets are those FineWeb's reference
implementation (datatrove) uses to decide what a "symbol" word and a line-final mark are.
"""
from __future__ import annotations

import re
import unicodedata

from data.curate.en_words import (
  cached_words,
  char_class,
  clear_cache,
  codepoints,
  warm_up,
  words,
)

__all__ = ["SENTENCE_PUNCT", "SYMBOL_CHARS", "TERMINAL_PUNCTUATION", "cached_words", "char_class",
           "clear_cache", "duplicates", "is_symbol_word", "sentence_count", "warm_up", "words"]

# --- sentences ---------------------------------------------------------------------------------

# spaCy's Sentencizer default punct_chars: a sentence ends after one of these tokens.
SENTENCE_PUNCT = frozenset(
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？"
    "𐩖𐩗𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑩂𑩃𑪛𑪜𑱁𑱂𖩮𖩯𖫵𖬷𖬸𖭄𛲟𝪈｡。")

_EXTRA_WS = re.compile(r"[^\S ]|  ")  # whitespace other than single spaces


def _is_punct(token: str) -> bool:
  """spaCy's `Token.is_punct`: every character is Unicode punctuation (category P*)."""
  return all(unicodedata.category(c)[0] == "P" for c in token)


def sentence_count(line: str) -> int:
  """Sentences in a stripped `line` as spaCy's Sentencizer splits it (0 for an empty line).

  A new sentence starts at the first token after a sentence-final mark (".", "!", "?", ...) that is
  neither punctuation nor itself such a mark. spaCy keeps whitespace other than a single " " after
  a token as a token of its own; one that follows a final mark also starts a sentence.
  """
  if _EXTRA_WS.search(line):
    toks: list[str] = []
    pos = 0
    for m in _WS_RUN.finditer(line):
      if m.group() == " ":
        continue  # a single space only separates (and may glue; see `_words_in_context`)
      toks += words(line[pos:m.start()])
      toks.append(" ")  # stands for the whitespace token: not punctuation, not a final mark
      pos = m.end()
    toks += words(line[pos:])
  else:
    toks = words(line)
  if not toks:
    return 0
  count = 1
  seen_end = False
  for tok in toks:
    if tok in SENTENCE_PUNCT:
      seen_end = True
    elif seen_end and not _is_punct(tok):
      count += 1
      seen_end = False
  return count


_WS_RUN = re.compile(r"\s+")


# --- punctuation sets (datatrove / FineWeb) ----------------------------------------------------


def _chars(spec: str) -> frozenset[str]:
  return frozenset(map(chr, codepoints(spec)))


# Sentence-final marks FineWeb counts as "line ends with punctuation": the Unicode Sentence_Terminal
# property (as of Unicode 15, the set datatrove's `TERMINAL_PUNCTUATION` lists) plus Khmer 17D6, 17D9, 17DA.
TERMINAL_PUNCTUATION = _chars(
    "21 2E 3F 589 61D-61F 6D4 700-702 7F9 837 839 83D-83E 964-965 104A-104B 1362 1367-1368 166E "
    "1735-1736 17D4-17D6 17D9-17DA 1803 1809 1944-1945 1AA8-1AAB 1B5A-1B5B 1B5E-1B5F 1B7D-1B7E "
    "1C3B-1C3C 1C7E-1C7F 203C-203D 2047-2049 2E2E 2E3C 2E53-2E54 3002 A4FF A60E-A60F A6F3 A6F7 "
    "A876-A877 A8CE-A8CF A92F A9C8-A9C9 AA5D-AA5F AAF0-AAF1 ABEB FE52 FE56-FE57 FF01 FF0E FF1F FF61 "
    "10A56-10A57 10F55-10F59 10F86-10F89 11047-11048 110BE-110C1 11141-11143 111C5-111C6 111CD "
    "111DE-111DF 11238-11239 1123B-1123C 112A9 1144B-1144C 115C2-115C3 115C9-115D7 11641-11642 "
    "1173C-1173E 11944 11946 11A42-11A43 11A9B-11A9C 11C41-11C42 11EF7-11EF8 11F43-11F44 16A6E-16A6F "
    "16AF5 16B37-16B38 16B44 16E98 1BC9F 1DA88")

# Characters that make a token a "symbol" rather than a word for Gopher's word count and mean word
# length (datatrove's PUNCTUATION_SET: ASCII/CJK punctuation, a few symbols, C0/C1 control
# characters other than tab and newline, and the sentence terminals above).
SYMBOL_CHARS = (frozenset("!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»")
                | _chars("0-8 B-1F 7F-9F") | TERMINAL_PUNCTUATION)


def is_symbol_word(word: str) -> bool:
  return all(c in SYMBOL_CHARS for c in word)


# --- repeated elements and n-grams ---------------------------------------------------------------


def duplicates(items: list[str]) -> tuple[int, int]:
  """(how many, total characters) of the items equal to an earlier item.

  Every occurrence after the first counts, so this is (all - distinct) in both count and length.
  """
  distinct = set(items)
  return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))
