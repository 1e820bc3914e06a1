"""English words as spaCy splits them, without spaCy: `words(text)`.

Library module, no entry point; the heuristic filters use it through `data.curate.text`.

Why a word splitter of our own: the published filters count "words" as tokens of spaCy's English
tokenizer (FineWeb's reference implementation, datatrove, calls `spacy.blank("en")` and drops
whitespace tokens), and punctuation tokens matter: Gopher's "80% of words contain a letter" rule
counts "," and "." as words. spaCy through datatrove splits ~0.5 MB/s; `words()` reimplements its
English rules with the standard `re` module and a per-chunk cache (~5-15 MB/s):

  1. split on whitespace (`str.split()`, the same `str.isspace` test spaCy uses);
  2. per chunk, spaCy's loop: a whole-chunk special case (contractions "don't" -> "do" "n't",
     abbreviations "Mr.", emoticons) wins; else peel one prefix and one suffix per round
     (longest suffix, first-listed prefix), stopping early when the remainder is a special case;
  3. the remainder is kept whole if it is a URL, else split at infixes (hyphens between letters,
     "a/b", "a,b", "x.Y", "1-2", "...");
  4. spaCy's second pass: runs of tokens that spell a special case with affixes are merged back
     (")" ":" -> "):"), including its quirk that a run across one space blocks a merge.

Rules and lists follow spaCy 3.x `spacy/lang/{punctuation,char_classes,tokenizer_exceptions}.py`,
`spacy/lang/en/{punctuation,tokenizer_exceptions}.py` and `spacy/tokenizer.pyx` (MIT). The result
equals spaCy's on the shared web samples, WikiText-2, Tiny Shakespeare, the stdlib corpus (1.77M
tokens) and on fuzzed strings (tests/test_curate_filters.py). Known differences: a few rare Latin
letters (in U+01C0-01C3, 0294, 2C7C-2C7D, A770-A7FF, AB5C-AB69) are letters here and not to spaCy
or the reverse.
"""
from __future__ import annotations

import functools
import re
import unicodedata

# --- character classes -------------------------------------------------------------------------


def char_class(codepoints) -> str:
  """A regex character-class body (no brackets) for a sorted iterable of code points."""
  out, start, prev = [], None, None
  for c in codepoints:
    if prev is not None and c == prev + 1:
      prev = c
      continue
    if start is not None:
      out.append(_span(start, prev))
    start = prev = c
  if start is not None:
    out.append(_span(start, prev))
  return "".join(out)


def _span(a: int, b: int) -> str:
  esc = lambda c: re.escape(chr(c))
  return esc(a) if a == b else f"{esc(a)}-{esc(b)}"


def codepoints(spec: str) -> list[int]:
  """Code points of a space-separated list of hex code points and ranges ("41-5A 61")."""
  out = []
  for part in spec.split():
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo, 16), int(hi or lo, 16) + 1))
  return out


# spaCy's letter classes (spacy/lang/char_classes.py ALPHA, ALPHA_LOWER, ALPHA_UPPER). Latin: the
# Unicode Ll / Lu letters of the Latin blocks spaCy lists; Greek and Cyrillic: the Russian,
# Ukrainian, Tatar and Macedonian alphabets only (Serbian "ђ" is not a letter to spaCy); and whole
# blocks of uncased scripts (Arabic, Hebrew, Indic, Ethiopic, Hangul, kana, CJK -- CJK punctuation
# U+3000-303F included, so "。" counts as a letter).
_LATIN_BLOCKS = ("41-5A 61-7A C0-D6 D8-F6 F8-24F 250-2AF 1D00-1D25 1D6B-1D77 1D79-1D9A 1E00-1EFF "
                 "2C60-2C7F A720-A7FF AB30-AB6F FF21-FF3A FF41-FF5A")
_LOWER_EXTRA = "αβγδεζηθικλμνξοπρςστυφχψωάέίόώήύёабвгдежзийклмнопрстуфхцчшщъыьэюяіїєґәөүҗңһѓѕјљњќѐѝ"
_UPPER_EXTRA = "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩΆΈΊΌΏΉΎЁАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯІЇЄҐӘӨҮҖҢҺЃЅЈЉЊЌЀЍ"
_UNCASED = ("591-5F4 620-64A 66E-6D5 6E5-6FF 750-77F 8A0-8BD 900-9FF B80-CFF D80-DFF 1100-137F "
            "2E80-2FDF 2FF0-30FF 31C0-31EF 3200-4DBF 4E00-9FFF AC00-D7AF F900-FAFF FB1D-FBB1 FBD3-FD3D "
            "FD50-FDC7 FDF0-FDFB FE30-FE4F FE70-FEFC 1EE00-1EEBB 1F200-1F2FF 20000-2A6DF 2A700-2EBEF "
            "2F800-2FA1F")
# spaCy's ICONS (char_classes._other_symbols): dingbats, arrows, box drawing, emoji, ... (the
# Unicode "So" symbols of an older Unicode version; newer emoji such as U+1FA70.. are not in it).
_ICONS = (
    "A6 A9 AE B0 482 58D-58E 60E-60F 6DE 6E9 6FD-6FE 7F6 9FA B70 BF3-BF8 BFA C7F D4F D79 F01-F03 F13 "
    "F15-F17 F1A-F1F F34 F36 F38 FBE-FC5 FC7-FCC FCE-FCF FD5-FD8 109E-109F 1390-1399 1940 19DE-19FF "
    "1B61-1B6A 1B74-1B7C 2100-2101 2103-2106 2108-2109 2114 2116-2117 211E-2123 2125 2127 2129 212E "
    "213A-213B 214A 214C-214D 214F 218A-218B 2195-2199 219C-219F 21A1-21A2 21A4-21A5 21A7-21AD "
    "21AF-21CD 21D0-21D1 21D3 21D5-21F3 2300-2307 230C-231F 2322-2328 232B-237B 237D-239A 23B4-23DB "
    "23E2-2426 2440-244A 249C-24E9 2500-25B6 25B8-25C0 25C2-25F7 2600-266E 2670-2767 2794-27BF "
    "2800-28FF 2B00-2B2F 2B45-2B46 2B4D-2B73 2B76-2B95 2B98-2BC8 2BCA-2BFE 2CE5-2CEA 2E80-2E99 "
    "2E9B-2EF3 2F00-2FD5 2FF0-2FFB 3004 3012-3013 3020 3036-3037 303E-303F 3190-3191 3196-319F "
    "31C0-31E3 3200-321E 322A-3247 3250 3260-327F 328A-32B0 32C0-32FE 3300-33FF 4DC0-4DFF A490-A4C6 "
    "A828-A82B A836-A837 A839 AA77-AA79 FDFD FFE4 FFE8 FFED-FFEE FFFC-FFFD 10137-1013F 10179-10189 "
    "1018C-1018E 10190-1019B 101A0 101D0-101FC 10877-10878 10AC8 1173F 16B3C-16B3F 16B45 1BC9C "
    "1D000-1D0F5 1D100-1D126 1D129-1D164 1D16A-1D16C 1D183-1D184 1D18C-1D1A9 1D1AE-1D1E8 1D200-1D241 "
    "1D245 1D300-1D356 1D800-1D9FF 1DA37-1DA3A 1DA6D-1DA74 1DA76-1DA83 1DA85-1DA86 1ECAC 1F000-1F02B "
    "1F030-1F093 1F0A0-1F0AE 1F0B1-1F0BF 1F0C1-1F0CF 1F0D1-1F0F5 1F110-1F16B 1F170-1F1AC 1F1E6-1F202 "
    "1F210-1F23B 1F240-1F248 1F250-1F251 1F260-1F265 1F300-1F3FA 1F400-1F6D4 1F6E0-1F6EC 1F6F0-1F6F9 "
    "1F700-1F773 1F780-1F7D8 1F800-1F80B 1F810-1F847 1F850-1F859 1F860-1F887 1F890-1F8AD 1F900-1F90B "
    "1F910-1F93E 1F940-1F970 1F973-1F976 1F97A 1F97C-1F9A2 1F9B0-1F9B9 1F9C0-1F9C2 1F9D0-1F9FF "
    "1FA60-1FA6D")


@functools.cache
def _classes() -> dict[str, str]:
  """Regex class bodies: "lower", "upper", "alpha" letters and "icons", built once."""
  latin = codepoints(_LATIN_BLOCKS)
  cat = lambda c: unicodedata.category(chr(c))
  uncased = codepoints(_UNCASED)
  lower = {c for c in latin if cat(c) == "Ll"} | set(map(ord, _LOWER_EXTRA)) | set(uncased)
  upper = {c for c in latin if cat(c) == "Lu"} | set(map(ord, _UPPER_EXTRA)) | set(uncased)
  alpha = lower | upper | {c for c in latin if cat(c)[0] == "L"}
  return {"lower": char_class(sorted(lower)), "upper": char_class(sorted(upper)),
          "alpha": char_class(sorted(alpha)), "icons": char_class(codepoints(_ICONS))}


def _entries(spec: str) -> list[str]:
  return spec.split()


# spaCy char_classes: punctuation, quotes, hyphens, currency and units (space-separated entries).
_PUNCT = _entries(r"… …… , : ; \! \? ¿ ؟ ¡ \( \) \[ \] \{ \} < > _ # \* & 。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪")
_QUOTES = _entries(r"\' \" ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 〈 〉 ⟦ ⟧")
_HYPHENS = _entries("- – — -- --- —— ~")
_CURRENCY = _entries(r"\$ £ € ¥ ฿ US\$ C\$ A\$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ € ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₴ ₵ ₶ ₷ ₸ ₹ ₺ "
                     r"₻ ₼ ₽ ₾ ₿")
_UNITS = _entries("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz "
          "m/s km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² "
          "дм³ см см² см³ мм мм² мм³ нм кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб "
          # "тбكم" (sic: spaCy's list lacks a space there, so "тб" alone is not a unit).
          "ТБ тбكم كم² كم³ م م² م³ سم سم² سم³ مم مم² مم³ كم غرام جرام جم كغ ملغ كوب اكواب")


@functools.cache
def _patterns() -> tuple:
  """(prefix_match, suffix_search, infix_finditer, url_match), spaCy's English rules."""
  k = _classes()
  al, au, a, icons = k["lower"], k["upper"], k["alpha"], f"[{k['icons']}]"
  q = "".join(_QUOTES)
  currency, units, punct, hyphens = ("|".join(x) for x in (_CURRENCY, _UNITS, _PUNCT, _HYPHENS))
  ellipses = [r"\.\.+", "…"]
  # spacy/lang/punctuation.py TOKENIZER_PREFIXES; alternation order decides ("…" before "……").
  prefixes = ["§", "%", "=", "—", "–", r"\+(?![0-9])"] + _PUNCT + ellipses + _QUOTES + _CURRENCY + [icons]
  # TOKENIZER_SUFFIXES. The class in the last-but-one rule is spaCy's verbatim, including the
  # "|" separators and "(?:" ")" that its string formatting leaves inside the brackets.
  suffixes = _PUNCT + ellipses + _QUOTES + [icons, "'s", "'S", "’s", "’S", "—", "–",
      r"(?<=[0-9])\+", r"(?<=°[FfCcKk])\.", rf"(?<=[0-9])(?:{currency})", rf"(?<=[0-9])(?:{units})",
      rf"(?<=[0-9{al}%²\-\+{punct}(?:{q})])\.", rf"(?<=[{au}][{au}])\."]
  # spacy/lang/en/punctuation.py TOKENIZER_INFIXES.
  infixes = ellipses + [icons, r"(?<=[0-9])[+\-\*^](?=[0-9-])",
      rf"(?<=[{al}{q}])\.(?=[{au}{q}])", rf"(?<=[{a}]),(?=[{a}])",
      rf"(?<=[{a}0-9])(?:{hyphens})(?=[{a}])", rf"(?<=[{a}0-9])[:<>=/](?=[{a}])"]
  prefix = re.compile("|".join("^" + p for p in prefixes))
  suffix = re.compile("|".join(p + "$" for p in suffixes))
  infix = re.compile("|".join(infixes))
  # spacy/lang/tokenizer_exceptions.py URL_PATTERN (after Diego Perini's URL regex, MIT): optional
  # scheme, optional user@, a public IPv4 address or host names ending in a lower-case TLD,
  # optional port and path.
  url = re.compile(
      r"(?u)^(?:(?:[\w\+\-\.]{2,})://)?(?:\S+(?::\S*)?@)?(?:"
      r"(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
      r"(?!172\.(?:1[6-9]|2\d|3[0-1])(?:\.\d{1,3}){2})"
      r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
      r"(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))"
      r"|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
      rf"(?:[{al}]{{2,63}}))(?::\d{{2,5}})?(?:[/?#]\S*)?$")
  return prefix.match, suffix.search, infix.finditer, url.match


# --- special cases (spaCy's tokenizer exceptions for English) --------------------------------------


def _special_cases() -> dict[str, tuple[str, ...]]:
  """Chunk -> its tokens, for every English special case (spacy/lang/en/tokenizer_exceptions.py)."""
  exc: dict[str, tuple[str, ...]] = {}

  def cased(*words):  # each word as written and title-cased
    return [w2 for w in words for w2 in (w, w.title())]

  def add(parts):
    exc["".join(parts)] = tuple(parts)

  for p in cased("i"):
    for tail in (("'m",), ("m",), ("'m", "a"), ("m", "a")):
      add((p,) + tail)
  will_would = [("'ll",), ("ll",), ("'ll", "'ve"), ("ll", "ve"), ("'d",), ("d",), ("'d", "'ve"), ("d", "ve")]
  for p in cased("i", "you", "he", "she", "it", "we", "they"):
    for tail in will_would:
      add((p,) + tail)
  for p in cased("i", "you", "we", "they"):
    add((p, "'ve")), add((p, "ve"))
  for p in cased("you", "we", "they"):
    add((p, "'re")), add((p, "re"))
  for p in cased("he", "she", "it"):
    add((p, "'s")), add((p, "s"))
  for w in ("who", "what", "when", "where", "why", "how", "there", "that", "this", "these", "those"):
    for p in cased(w):
      if w not in ("these", "those"):
        add((p, "'s")), add((p, "s"))
      for tail in will_would[:4]:
        add((p,) + tail)
      if w not in ("that", "this"):
        add((p, "'re")), add((p, "re")), add((p, "'ve")), add((p, "ve"))
      for tail in will_would[4:]:
        add((p,) + tail)
  for v in cased("ca", "could", "do", "does", "did", "had", "may", "might", "must", "need", "ought",
                 "sha", "should", "wo", "would"):
    add((v, "n't")), add((v, "nt")), add((v, "n't", "'ve")), add((v, "nt", "ve"))
  for v in cased("could", "might", "must", "should", "would"):
    add((v, "'ve")), add((v, "ve"))
  for v in cased("ai", "are", "is", "was", "were", "have", "has", "dare"):
    add((v, "n't")), add((v, "nt"))
  for w in cased("doin", "goin", "nothin", "nuthin", "ol", "somethin"):
    add((w,)), add((w + "'",))
  for w in ("em", "ll", "nuff"):
    add((w,)), add(("'" + w,))
  for h in range(1, 13):
    for period in ("a.m.", "am", "p.m.", "pm"):
      add((str(h), period))
  for parts in [("y'", "all"), ("y", "all"), ("how", "'d", "'y"), ("How", "'d", "'y"),
                ("not", "'ve"), ("not", "ve"), ("Not", "'ve"), ("Not", "ve"), ("can", "not"),
                ("Can", "not"), ("gon", "na"), ("Gon", "na"), ("got", "ta"), ("Got", "ta"),
                ("let", "'s"), ("Let", "'s"), ("c'm", "on"), ("C'm", "on")]:
    add(parts)
  single = (
      "'S 's ‘S ‘s and/or w/o 're 'Cause 'cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz 'bout ma'am Ma'am "
      "o'clock O'clock lovin' Lovin' lovin Lovin havin' Havin' havin Havin doin' Doin' doin Doin "
      "goin' Goin' goin Goin Mt. Ak. Ala. Apr. Ariz. Ark. Aug. Calif. Colo. Conn. Dec. Del. Feb. Fla. "
      "Ga. Ia. Id. Ill. Ind. Jan. Jul. Jun. Kan. Kans. Ky. La. Mar. Mass. Mich. Minn. Miss. N.C. N.D. "
      "N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. S.C. Sep. Sept. Tenn. Va. Wash. "
      "Wis. 'd a.m. Adm. Bros. co. Co. Corp. D.C. Dr. e.g. E.g. E.G. Gen. Gov. i.e. I.e. I.E. Inc. Jr. "
      "Ltd. Md. Messrs. Mo. Mont. Mr. Mrs. Ms. p.m. Ph.D. Prof. Rep. Rev. Sen. St. vs. v.s.")
  for w in single.split():
    add((w,))
  # Words that read as contractions but are usually words ("ill", "its", "were", "well", ...).
  for w in cased("ill", "its", "hell", "shell", "shed", "were", "well", "whore"):
    exc.pop(w, None)
  # spacy/lang/tokenizer_exceptions.py BASE_EXCEPTIONS that can occur inside a whitespace-free chunk.
  base = ("\\t \\n \u2014 ' \\\") <space> '' C++ " + " ".join(c + "." for c in "abcdefghijklmnopqrstuvwxyzäöü"))
  for w in base.split():
    add((w,))
  for w in _EMOTICONS.split():
    add((w,))
  for u in "cfkCFK":
    add(("°", u, "."))
  # Every case with an apostrophe also exists with the typographic one (spacy.util.update_exc).
  for key, parts in list(exc.items()):
    if "'" in key:
      exc[key.replace("'", "’")] = tuple(p.replace("'", "’") for p in parts)
  return exc


# spacy/lang/tokenizer_exceptions.py emoticons.
_EMOTICONS = r"""
:) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-;
:( :-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P :-P :p :-p
:O :-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D xD XD xDD XDD 8D
8-D ^_^ ^__^ ^___^ >.< >.> <.< ._. ;_; -_- -__- v.v V.V v_v V_V o_o o_O O_o O_O 0_o o_0 0_0 o.O O.o
O.O o.o 0.0 o.0 0.o @_@ <3 <33 <333 </3 (^_^) (-_-) (._.) (>_<) (*_*) (¬_¬) ಠ_ಠ ಠ︵ಠ (ಠ_ಠ) ¯\(ツ)/¯
(╯°□°）╯︵┻━┻ ><(((*>
"""

SPECIAL_CASES: dict[str, tuple[str, ...]] = _special_cases()

# --- tokenizer ---------------------------------------------------------------------------------


_SUFFIX_TAIL = 8


def _split_affixes(chunk: str, specials: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
  """spaCy's first pass over one whitespace-free chunk (Tokenizer._split_affixes/_attach_tokens)."""
  special = specials.get(chunk)
  if special is not None:
    return special
  prefix_match, suffix_search, infix_finditer, url_match = _patterns()
  prefixes: list[str] = []
  suffixes: list[str] = []
  s = chunk
  last = -1
  # One prefix and one suffix per round until nothing changes; a special-case remainder stops it.
  while s and len(s) != last:
    if s in specials:
      break
    last = len(s)
    m = prefix_match(s)
    pre = m.end() if m else 0
    if pre and s[pre:] in specials:
      prefixes.append(s[:pre])
      s = s[pre:]
      break
    rest = s[pre:] if pre else s  # spaCy searches the rest, so look-behinds cannot see the prefix
    # Every suffix rule but "\.\.+" matches at most 5 characters: search the tail only, and the whole
    # rest when the match starts at the tail's first character (it might extend further left).
    tail = len(rest) - _SUFFIX_TAIL
    m = suffix_search(rest, tail) if tail > 0 else suffix_search(rest)
    if m and tail > 0 and m.start() == tail:
      m = suffix_search(rest)
    suf = m.end() - m.start() if m else 0
    if suf and s[:-suf] in specials:
      suffixes.append(s[-suf:])
      s = s[:-suf]
      break
    if pre and suf and pre + suf <= len(s):
      prefixes.append(s[:pre])
      suffixes.append(s[-suf:])
      s = s[pre:-suf]
    elif pre:
      prefixes.append(s[:pre])
      s = s[pre:]
    elif suf:
      suffixes.append(s[-suf:])
      s = s[:-suf]
  out = prefixes
  if s:
    special = specials.get(s)
    if special is not None:
      out.extend(special)
    elif url_match(s):
      out.append(s)
    else:
      start = 0
      for m in infix_finditer(s):
        i, j = m.start(), m.end()
        if i == 0:  # an infix at the very start is not a split point (spaCy: start_before_infixes)
          continue
        if i != start:
          out.append(s[start:i])
        if i != j:
          out.append(s[i:j])
        start = j
      if s[start:]:
        out.append(s[start:])
  out.extend(reversed(suffixes))
  return tuple(out)


@functools.cache
def _special_patterns() -> tuple[dict[tuple[str, ...], str], int]:
  """Token sequences that spaCy's second pass merges back into a special case, e.g. ")" ":" -> "):".

  spaCy adds a special case to this phrase matcher when the case itself has a prefix, suffix or
  infix; the pattern is how the first pass splits it with special cases turned off.
  """
  prefix_match, suffix_search, infix_finditer, _ = _patterns()
  out = {}
  for key in SPECIAL_CASES:
    if prefix_match(key) or suffix_search(key) or next(infix_finditer(key), None):
      pattern = _split_affixes(key, {})
      if len(pattern) > 1:  # a one-token pattern would replace a token by itself
        out[pattern] = key
  return out, max(map(len, out))


def _kept_merges(toks: tuple[str, ...], lo: int, hi: int) -> dict[int, int]:
  """spaCy's second pass (Tokenizer._apply_special_cases) over toks[lo:hi]: start -> length.

  Every match marks its tokens as seen, taken or not; matches are visited longest first, then
  leftmost, and one is taken if its first and last tokens are still unseen.
  """
  patterns, longest = _special_patterns()
  found = [(n, i) for n in range(min(longest, hi - lo), 1, -1) for i in range(lo, hi - n + 1)
           if toks[i:i + n] in patterns]
  seen: set[int] = set()
  kept = {}
  for n, i in found:
    if i not in seen and i + n - 1 not in seen:
      kept[i] = n
    seen.update(range(i, i + n))
  return kept


def _apply_merges(toks: tuple[str, ...], kept: dict[int, int], lo: int, hi: int) -> list[str]:
  patterns = _special_patterns()[0]
  out: list[str] = []
  i = lo
  while i < hi:
    n = kept.get(i)
    if n is not None and i + n <= hi:
      out.extend(SPECIAL_CASES[patterns[toks[i:i + n]]])
      i += n
    else:
      out.append(toks[i])
      i += 1
  return out


class _Glued(tuple):
  """Tokens of a chunk that the second pass changed: a neighbour glued by one space may block it."""
  first: tuple[str, ...]


def split_chunk(chunk: str) -> tuple[str, ...]:
  """spaCy English tokens of one whitespace-free chunk standing alone (uncached; see `words`)."""
  toks = _split_affixes(chunk, SPECIAL_CASES)
  if len(toks) < 2:
    return toks
  kept = _kept_merges(toks, 0, len(toks))
  if not kept:
    return toks
  merged = _apply_merges(toks, kept, 0, len(toks))
  if tuple(merged) == toks:
    return toks  # e.g. "it's" re-matched as itself: a neighbour blocking that would change nothing
  out = _Glued(merged)
  out.first = toks
  return out


_CACHE: dict[str, tuple[str, ...]] = {}
_CACHE_MAX = 1_000_000  # ~100 MB worst case; cleared when full (the result never depends on it)
_CHUNK = re.compile(r"\S+")


def words(text: str) -> list[str]:
  """spaCy-compatible English words of `text` (whitespace tokens dropped, like datatrove)."""
  get = _CACHE.get
  out: list[str] = []
  glued: list[tuple[int, int, int]] = []  # (chunk index, output offset, tokens) of chunks the
  # second pass changed
  chunks = text.split()
  for k, chunk in enumerate(chunks):
    toks = get(chunk)
    if toks is None:
      if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
      toks = _CACHE[chunk] = split_chunk(chunk)
    if toks.__class__ is _Glued:
      glued.append((k, len(out), len(toks)))
    out += toks
  if glued:
    _redo_in_context(text, chunks, glued, out)
  return out


def _first_pass(chunk: str) -> tuple[str, ...]:
  toks = _CACHE.get(chunk) or split_chunk(chunk)
  return toks.first if toks.__class__ is _Glued else toks


def _redo_in_context(text: str, chunks: list[str], glued: list[tuple[int, int, int]],
                     out: list[str]) -> None:
  """Redoes, in `out`, the chunks whose merges a neighbour glued by a single space may block.

  spaCy's phrase matcher also matches token runs across one " " (e.g. ":" then "x" in ": x.Y"
  reads as the emoticon ":x"). Such a match is never applied (its text holds the space, which no
  special case does), but it still marks its tokens as seen and so can block a merge inside the
  chunk. Only matches within `longest` - 1 tokens of the chunk matter, so each such chunk is redone
  over a window of its glued neighbours' first-pass tokens.
  """
  spans = [m.span() for m in _CHUNK.finditer(text)]
  longest = _special_patterns()[1]

  def glued_to_next(j: int) -> bool:
    return spans[j][1] + 1 == spans[j + 1][0] and text[spans[j][1]] == " "

  for k, offset, n_out in reversed(glued):
    own = _first_pass(chunks[k])
    before: list[str] = []
    j = k
    while len(before) < longest - 1 and j > 0 and glued_to_next(j - 1):
      j -= 1
      before[:0] = _first_pass(chunks[j])
    after: list[str] = []
    j = k
    while len(after) < longest - 1 and j + 1 < len(chunks) and glued_to_next(j):
      j += 1
      after += _first_pass(chunks[j])
    if not before and not after:
      continue
    window = tuple(before) + own + tuple(after)
    lo, hi = len(before), len(before) + len(own)
    kept = {i: n for i, n in _kept_merges(window, 0, len(window)).items() if lo <= i and i + n <= hi}
    out[offset:offset + n_out] = _apply_merges(window, kept, lo, hi)


@functools.lru_cache(maxsize=4)
def cached_words(text: str) -> tuple[str, ...]:
  """`words` memoized over the last few texts: a pipeline's filters see the same text in a row."""
  return tuple(words(text))


def warm_up() -> None:
  """Compiles the rules (~0.1 s): call once per worker before timing or serving documents."""
  _patterns()
  _special_patterns()


def clear_cache() -> None:
  """Empties the per-chunk and per-text caches (benchmarks start cold with it)."""
  _CACHE.clear()
  cached_words.cache_clear()
