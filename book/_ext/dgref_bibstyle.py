"""Author-year bibliography for the book (a local Sphinx extension).

sphinxcontrib-bibtex labels entries with the pybtex formatting style's label style. Its
built-in styles give numbers (``plain``) or alphabetic keys (``alpha``: ``[KAAL22]``), while
the text cites by author and year. This extension registers

* the pybtex formatting style ``dgref`` (``bibtex_default_style: dgref``): pybtex's
  ``plain`` entries (sorted by author, year, title; ``eprint`` rendered as an arXiv link,
  ``doi`` as a doi.org link) labelled ``Karras et al. 2022``, ``Ho and Salimans 2022``,
  ``Hutchinson 1989``; two papers with the same label get ``2021a``, ``2021b``;
* the sphinxcontrib-bibtex reference style ``dgref_author_year``
  (``bibtex_reference_style: dgref_author_year``): author-year citations whose year is the
  label's year, suffix included, so that ``{cite:p}`` reads ``(Song et al. 2021a)`` exactly as
  the bibliography labels it, and ``{cite:t}`` reads ``Song et al. (2021a)``.

Entries must list every author: ``and others`` is refused at build time (it rendered as
"Verine and others" in the bibliography), as are entries without a year.
"""
from __future__ import annotations

import codecs
import re
import string
from collections import Counter
from dataclasses import dataclass, field as dc_field

import latexcodec  # noqa: F401 -- registers the "ulatex" codec
import pybtex.plugin
import sphinxcontrib.bibtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.template import field, first_of, join, node, optional

from sphinxcontrib.bibtex.style.referencing import BracketStyle, PersonStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle
from sphinxcontrib.bibtex.style.referencing.basic_author_year import (
    BasicAuthorYearParentheticalReferenceStyle,
    BasicAuthorYearTextualReferenceStyle,
)
from sphinxcontrib.bibtex.style.referencing.extra_author import ExtraAuthorReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_empty import ExtraEmptyReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_label import ExtraLabelReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_year import ExtraYearReferenceStyle
from sphinxcontrib.bibtex.style.template import join2, post_text, pre_text, reference

_YEAR_RE = re.compile(r"(\d{4}[a-z]?|n\.d\.[a-z]?)$")


def _plain(latex: str) -> str:
    """A LaTeX name as plain text: accents decoded, braces dropped."""
    return codecs.decode(latex, "ulatex").replace("{", "").replace("}", "")


def _surname(person) -> str:
    parts = person.prelast_names + person.last_names
    return _plain(" ".join(parts))


def author_year_base(entry) -> str:
    """``Karras et al. 2022`` / ``Ho and Salimans 2022`` / ``Hutchinson 1989``."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    surnames = [_surname(p) for p in persons]
    if any(s.lower() == "others" for s in surnames):
        raise ValueError(f"bibliography entry {entry.key!r}: 'and others' in the author list; "
                         "list every author")
    year = entry.fields.get("year")
    if not year:
        raise ValueError(f"bibliography entry {entry.key!r} has no year")
    if not surnames:
        who = _plain(entry.fields.get("title", entry.key))
    elif len(surnames) == 1:
        who = surnames[0]
    elif len(surnames) == 2:
        who = f"{surnames[0]} and {surnames[1]}"
    else:
        who = f"{surnames[0]} et al."
    return f"{who} {year}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """Author-year labels, made unique with a, b, ... after the year (in sorted order)."""

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        bases = [author_year_base(e) for e in entries]
        counts = Counter(bases)
        seen: Counter = Counter()
        for base in bases:
            if counts[base] == 1:
                yield base
            else:
                yield base + string.ascii_lowercase[seen[base]]
                seen[base] += 1


class AuthorYearStyle(PlainStyle):
    """pybtex ``plain`` entries with author-year labels."""

    default_label_style = AuthorYearLabelStyle


@node
def label_year(children, data):
    """The year as the bibliography labels it (``2021a`` where two labels would clash)."""
    assert not children
    formatted = data.get("formatted_entry")
    if formatted is not None:
        match = _YEAR_RE.search(formatted.label)
        if match:
            return Text(match.group(1))
    return first_of[optional[field("year")], "n.d."].format_data(data)


@dataclass
class _Parenthetical(BasicAuthorYearParentheticalReferenceStyle):
    def inner(self, role_name):
        return join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
            pre_text,
            reference[join(sep=self.author_year_sep)[
                self.person.author_or_editor_or_title(full="s" in role_name), label_year]],
            post_text,
        ]


@dataclass
class _Textual(BasicAuthorYearTextualReferenceStyle):
    def inner(self, role_name):
        return join(sep=self.text_reference_sep)[
            self.person.author_or_editor_or_title(full="s" in role_name),
            join[self.bracket.left,
                 join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
                     pre_text, reference[label_year], post_text],
                 self.bracket.right],
        ]


def _round() -> BracketStyle:
    return BracketStyle(left="(", right=")")


@dataclass
class DgrefAuthorYearReferenceStyle(AuthorYearReferenceStyle):
    """``(Kim et al. 2023)``, ``Kim et al. (2023)``: the same text as the bibliography label."""

    bracket_textual: BracketStyle = dc_field(default_factory=_round)
    bracket_parenthetical: BracketStyle = dc_field(default_factory=_round)
    person: PersonStyle = dc_field(default_factory=PersonStyle)
    author_year_sep: str = " "

    def __post_init__(self):
        # AuthorYearReferenceStyle.__post_init__ would add the stock styles first; build the
        # list here instead and let GroupReferenceStyle finish the set-up.
        self.styles.extend([
            _Parenthetical(bracket=self.bracket_parenthetical, person=self.person,
                           author_year_sep=self.author_year_sep,
                           pre_text_sep=self.pre_text_sep, post_text_sep=self.post_text_sep),
            _Textual(bracket=self.bracket_textual, person=self.person,
                     text_reference_sep=self.text_reference_sep,
                     pre_text_sep=self.pre_text_sep, post_text_sep=self.post_text_sep),
            ExtraAuthorReferenceStyle(bracket=self.bracket_author, person=self.person),
            ExtraLabelReferenceStyle(bracket=self.bracket_label),
            ExtraYearReferenceStyle(bracket=self.bracket_year),
            ExtraEmptyReferenceStyle(),
        ])
        super(AuthorYearReferenceStyle, self).__post_init__()


def _register():
    pybtex.plugin.register_plugin("pybtex.style.formatting", "dgref", AuthorYearStyle,
                                  force=True)
    pybtex.plugin.register_plugin("pybtex.style.labels", "dgref_author_year",
                                  AuthorYearLabelStyle, force=True)
    sphinxcontrib.bibtex.plugin.register_plugin(
        "sphinxcontrib.bibtex.style.referencing", "dgref_author_year",
        DgrefAuthorYearReferenceStyle, force=True)


_register()


def setup(app):
    _register()
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
