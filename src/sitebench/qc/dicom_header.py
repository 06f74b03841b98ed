"""A small, fast, pure-Python DICOM header reader with a pydicom-compatible subset API.

Why: importing pydicom alone costs ~0.3 s and ~40 MB, more than dcm2niix spends converting a
whole series, and the inspect path only needs the header. This module imports nothing beyond
the standard library (no pydicom, no numpy) and reads each file once (one ``read`` of up to
:data:`CHUNK` bytes, more only for headers larger than that), parsing with ``struct``.

What it reads (DICOM PS3.10 7.1 file format, PS3.5 for the encoding):

* the 128-byte preamble and ``DICM`` prefix (a file without them is rejected, as pydicom's
  ``dcmread(force=False)`` rejects it), then the file meta group 0002 (explicit VR LE);
* the data set in the transfer syntax the meta names (PS3.5 A.1 implicit VR LE, A.2 explicit
  VR LE, A.3 explicit VR BE, A.5 deflated explicit VR LE; any other, e.g. compressed, is
  explicit VR LE, A.4) up to the pixel data (7FE0,0010);
* data elements (PS3.5 7.1) of every VR (6.2), the 4-byte-length ones included; sequences
  (7.5) of defined or undefined length, parsed lazily: a sequence keeps its byte range and its
  items are parsed on first access, so a large private sequence costs a scan, not objects.

Values convert as pydicom 3's defaults do (``reading_validation_mode`` WARN): see
:func:`_convert`. Differences from pydicom: MultiValue is a plain list, PersonName / UID / DSfloat /
IS are plain ``str`` / ``float`` / ``int``; ISO 2022 code extensions and character sets other than
those in :data:`_CHARSETS` decode as latin1; an element with an unknown VR keeps its bytes where
pydicom raises on access; nesting deeper than :data:`MAX_DEPTH` raises :class:`HeaderError`.
Any damage raises :class:`HeaderError` (a ``ValueError``), never anything else.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any, Iterable, Iterator

__all__ = ["read_header", "HeaderDataset", "HeaderElement", "HeaderError", "Tag", "PrivateBlock",
           "tag_for_keyword", "keyword_for_tag", "CHUNK", "MAX_DEPTH"]

#: Bytes read first; a header that runs past them is read again with the whole file (up to MAX_FILE).
CHUNK = 1 << 20
MAX_FILE = 1 << 31
#: Deepest sequence nesting accepted (PS3.5 7.5 sets no limit; real files nest < 10).
MAX_DEPTH = 64
#: Largest inflated data set of a deflated file (PS3.5 A.5) accepted: a guard against zip bombs.
MAX_INFLATED = 1 << 30

_EXPLICIT_LE, _IMPLICIT_LE, _BIG_ENDIAN = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")  # Deflated Explicit VR LE / Deflated Image Frame
_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00009, 0x7FE00008))  # stop_before_pixels, as pydicom
_CHARSET_TAG = 0x00080005
_PIXREP_TAG = 0x00280103
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_LE, _EXPLICIT_BE = struct.Struct("<HH2sH"), struct.Struct(">HH2sH")  # group, element, VR, short length
_IMPLICIT_LE, _IMPLICIT_BE = struct.Struct("<HHL"), struct.Struct(">HHL")
_ULONG_LE, _ULONG_BE = struct.Struct("<L"), struct.Struct(">L")
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

#: PS3.5 6.2 VRs; those of PS3.5 7.1.2 Table 7.1-1 with a 2-byte reserved field and 4-byte length.
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_STR_VRS = frozenset(("AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                      "UI", "UR", "UT"))
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_BYTES_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or SS", "US or OW",
                        "US or SS or OW"))
#: SpecificCharacterSet (PS3.3 C.12.1.1.2) -> Python codec; anything else decodes as latin1.
_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO 2022 IR 6": "latin_1", "ISO_IR 100": "latin_1",
             "ISO 2022 IR 100": "latin_1", "ISO_IR 192": "utf_8", "ISO_IR 101": "iso8859_2",
             "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5",
             "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8",
             "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15", "ISO_IR 166": "iso8859_11",
             "ISO_IR 13": "shift_jis", "GB18030": "gb18030", "GBK": "gbk"}
#: pydicom corrects these 'US or SS' tags by PixelRepresentation (filewriter._AMBIGUOUS_US_SS_TAGS).
_LUT_DESCRIPTORS = frozenset((0x00281101, 0x00281102, 0x00281103, 0x00283002))


class HeaderError(ValueError):
    """The file is not DICOM, or is damaged in a way its header cannot be read past."""


class Tag(int):
    """A DICOM tag (PS3.5 7.1.1): group << 16 | element, as pydicom's BaseTag."""

    __slots__ = ()

    @property
    def group(self) -> int:
        return self >> 16

    @property
    def element(self) -> int:
        return self & 0xFFFF

    elem = element

    @property
    def is_private(self) -> bool:
        """Odd group (PS3.5 7.8)."""
        return bool((self >> 16) & 1)

    @property
    def is_private_creator(self) -> bool:
        """(gggg,0010-00FF) of an odd group: the element naming a private block (PS3.5 7.8.1)."""
        return bool((self >> 16) & 1) and 0x10 <= (self & 0xFFFF) <= 0xFF

    def __repr__(self) -> str:
        return f"({self >> 16:04X},{self & 0xFFFF:04X})"

    __str__ = __repr__


# --------------------------------------------------------------------------- dictionaries
#: The standard dictionary as text ("\n" + lines "TAG VR Keyword" + "\n"), searched per tag or keyword and
#: the answers cached: a series asks about the same hundred or so tags in every file, and parsing all
#: 5,000 entries up front cost more time and memory (14 ms, 4 MiB) than reading a small series.
_TEXT: str | None = None
_REPEATERS: list[tuple[int, int, str, str]] | None = None  # (value, mask, VR, keyword)
_BY_TAG: dict[int, tuple[str, str] | None] = {}
_BY_KEYWORD: dict[str, int | None] = {}
_CACHE_LIMIT = 1 << 16  # distinct tags a damaged file can ask about are unbounded; the cache is not
_PRIVATE: dict[str, dict[str, str]] = {}


def _vr_name(token: str) -> str:
    return token.replace("/", " or ")


def _standard_text() -> str:
    """The generated tables on first use (PS3.6 data dictionary via pydicom); repeaters parsed (86 lines)."""
    global _TEXT, _REPEATERS
    if _TEXT is None:
        from sitebench.qc import _dicom_dictionary as d

        repeaters = []
        for line in d.REPEATERS.split("\n"):
            parts = line.split(" ")
            mask = parts[0]
            repeaters.append((int(mask.replace("x", "0"), 16), int("".join("F0"[c == "x"] for c in mask), 16),
                              _vr_name(parts[1]), parts[2] if len(parts) > 2 else ""))
        _REPEATERS, _TEXT = repeaters, "\n" + d.STANDARD + "\n"
    return _TEXT


def _remember(cache: dict, key: Any, value: Any) -> Any:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _dictionary_entry(tag: int) -> tuple[str, str] | None:
    """(VR, keyword) of a standard or repeating-group tag, None for private/unknown (pydicom get_entry)."""
    try:
        return _BY_TAG[tag]
    except KeyError:
        pass
    text = _standard_text()
    entry = None
    if 0 <= tag <= 0xFFFFFFFF:
        at = text.find(f"\n{tag:08X} ")  # tags and keywords are unique in PS3.6: find, faster than rfind
        if at >= 0:
            parts = text[at + 1:text.index("\n", at + 1)].split(" ")
            entry = (_vr_name(parts[1]), parts[2] if len(parts) > 2 else "")
        elif not (tag >> 16) & 1:
            for value, mask, vr, keyword in _REPEATERS:  # type: ignore[union-attr]
                if (tag ^ value) & mask == 0:
                    entry = (vr, keyword)
                    break
    return _remember(_BY_TAG, tag, entry)


def _private_vr(creator: str, tag: int) -> str | None:
    """VR of a private element from the creator's dictionary (pydicom get_private_entry's key order)."""
    table = _PRIVATE.get(creator)
    if table is None:
        from sitebench.qc import _dicom_dictionary as d

        rows = d.PRIVATE.get(creator)
        if rows is None:
            return None
        parts = rows.split(" ")
        table = _PRIVATE[creator] = {parts[i]: _vr_name(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    g, e = f"{tag >> 16:04X}", f"{tag & 0xFFFF:04X}"
    for key in (g + e, g + "xx" + e[2:], g[:2] + "xxxx" + e[2:]):
        vr = table.get(key)
        if vr is not None:
            return vr
    return None


def tag_for_keyword(keyword: str) -> int | None:
    """The tag of a standard keyword (PS3.6), or None."""
    try:
        return _BY_KEYWORD[keyword]
    except KeyError:
        pass
    tag = None
    if keyword.isidentifier():  # a keyword is letters and digits: no search can match across lines
        text = _standard_text()
        at = text.find(f" {keyword}\n")
        if at >= 0:
            line = text.rfind("\n", 0, at) + 1
            tag = int(text[line:line + 8], 16)
    return _remember(_BY_KEYWORD, keyword, tag)


def keyword_for_tag(tag: int) -> str:
    """The keyword of a standard tag, '' for private or unknown tags."""
    entry = _dictionary_entry(tag)
    return entry[1] if entry else ""


def _to_tag(key: Any) -> int:
    """int, (group, element), keyword or 'GGGGEEEE' hex -> int tag; KeyError when it is none of them."""
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key <= 0xFFFFFFFF:
            return key
    elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(x, int) for x in key):
        if 0 <= key[0] <= 0xFFFF and 0 <= key[1] <= 0xFFFF:
            return key[0] << 16 | key[1]
    elif isinstance(key, str):
        tag = tag_for_keyword(key)
        if tag is not None:
            return tag
        try:
            value = int(key, 16)
        except ValueError:
            value = -1
        if 0 <= value <= 0xFFFFFFFF and len(key.removeprefix("0x")) <= 8:
            return value
    raise KeyError(key)


# --------------------------------------------------------------------------- elements and data sets
class _Buffer:
    """The bytes of one file (or its inflated data set), shared by every element read from it."""

    __slots__ = ("data", "little", "prefix")

    def __init__(self, data: bytes, little: bool) -> None:
        self.data = data
        self.little = little
        self.prefix = "<" if little else ">"


class HeaderElement:
    """One data element (PS3.5 7.1): tag, VR, value (converted on first access), as pydicom's DataElement."""

    __slots__ = ("tag", "VR", "_buf", "_start", "_end", "_value", "_parent", "_implicit", "is_undefined_length")
    is_raw = False  # pydicom's RawDataElement says True: callers ask before reading the bytes themselves

    def __init__(self, tag: int, vr: str, buf: _Buffer, start: int, end: int, parent: "HeaderDataset",
                 implicit: bool, undefined: bool = False) -> None:
        self.tag = Tag(tag)
        self.VR = vr
        self._buf, self._start, self._end = buf, start, end
        self._value: Any = _UNSET
        self._parent = parent
        self._implicit = implicit
        self.is_undefined_length = undefined

    @property
    def keyword(self) -> str:
        return "" if self.tag >> 16 & 1 else keyword_for_tag(self.tag)

    @property
    def length(self) -> int:
        return self._end - self._start

    @property
    def value(self) -> Any:
        if self._value is _UNSET:
            self._value = _convert(self)
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._value = value

    @property
    def raw(self) -> bytes:
        """The value's bytes as stored (no conversion)."""
        return self._buf.data[self._start:self._end]

    @property
    def VM(self) -> int:
        v = self.value
        if v is None or v == "" or v == b"":
            return 0
        return len(v) if isinstance(v, list) else 1

    def __repr__(self) -> str:
        return f"{self.tag!r} {self.keyword or 'Private'} {self.VR}: {self.value!r:.80}"


_UNSET = object()


class PrivateBlock:
    """One private block (PS3.5 7.8.1): ``block[0x10]`` is element (gggg,xx10) of the creator's block xx."""

    def __init__(self, dataset: "HeaderDataset", group: int, creator: str, block: int) -> None:
        self.dataset, self.group, self.private_creator, self.block_start = dataset, group, creator, block << 8

    def get_tag(self, element_offset: int) -> Tag:
        if not 0 <= element_offset <= 0xFF:
            raise ValueError("Element offset must be less than 256")
        return Tag(self.group << 16 | self.block_start | element_offset)

    def __getitem__(self, element_offset: int) -> HeaderElement:
        return self.dataset[self.get_tag(element_offset)]

    def __contains__(self, element_offset: int) -> bool:
        return self.get_tag(element_offset) in self.dataset


class HeaderDataset:
    """A data set (PS3.5 7): elements by tag, read-only, with the pydicom Dataset calls the parser uses."""

    def __init__(self, parent: "HeaderDataset | None" = None) -> None:
        self._elements: dict[int, HeaderElement] = {}
        self._parent = parent
        self._encoding: str | None = None
        self.file_meta: HeaderDataset | None = None
        self.is_little_endian = True
        self.is_implicit_VR = False
        self.filename: str | None = None

    # -- lookup
    def _find(self, key: Any) -> HeaderElement | None:
        try:
            return self._elements.get(key if type(key) is int or type(key) is Tag else _to_tag(key))
        except KeyError:
            return None

    def __getitem__(self, key: Any) -> HeaderElement:
        element = self._find(key)
        if element is None:
            raise KeyError(key)
        if element.VR in _AMBIGUOUS:
            _resolve_ambiguous(element)
        return element

    def get_item(self, key: Any) -> HeaderElement | None:
        """The element (converted lazily) or None, as pydicom's ``Dataset.get_item``."""
        element = self._find(key)
        if element is not None and element.VR in _AMBIGUOUS:
            _resolve_ambiguous(element)
        return element

    def get(self, key: Any, default: Any = None) -> Any:
        """Keyword -> value; tag (int or tuple) -> element, as pydicom's ``Dataset.get``."""
        if isinstance(key, str):
            try:
                tag = _to_tag(key)
            except KeyError:
                return default
            element = self._elements.get(tag)
            return default if element is None else self[tag].value
        element = self._find(key)
        return default if element is None else self[element.tag]

    def __contains__(self, key: Any) -> bool:
        return self._find(key) is not None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        tag = tag_for_keyword(name)
        if tag is None or tag not in self._elements:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        return self[tag].value

    def __iter__(self) -> Iterator[HeaderElement]:
        for tag in sorted(self._elements):
            yield self[tag]

    def elements(self) -> Iterator[HeaderElement]:
        return iter(self)

    def keys(self) -> list[Tag]:
        return [Tag(t) for t in sorted(self._elements)]

    def __len__(self) -> int:
        return len(self._elements)

    def __bool__(self) -> bool:
        return True

    def private_block(self, group: int, private_creator: str, create: bool = False) -> PrivateBlock:
        """The block of ``private_creator`` in odd ``group`` (PS3.5 7.8.1); KeyError when absent."""
        if create:
            raise ValueError("this reader is read-only")
        if not private_creator:
            raise ValueError("Private creator must have a value")
        if group % 2 == 0:
            raise ValueError("Tag must be private if private creator is given")
        base = group << 16
        for tag in sorted(t for t in self._elements if base | 0x10 <= t <= base | 0xFF):
            if self[tag].value == private_creator:
                return PrivateBlock(self, group, private_creator, tag & 0xFF)
        raise KeyError(f"Private creator '{private_creator}' not found")

    def get_private_item(self, group: int, element_offset: int, private_creator: str) -> HeaderElement:
        return self.private_block(group, private_creator)[element_offset]

    # -- encoding context
    @property
    def _text_encoding(self) -> str:
        """Codec of this data set's text: its own (0008,0005), else its parent's (PS3.5 6.1.2.3)."""
        if self._encoding is None:
            element = self._elements.get(_CHARSET_TAG)
            if element is not None:
                value = element.value
                first = value[0] if isinstance(value, list) and value else value
                self._encoding = _CHARSETS.get(first if isinstance(first, str) else "", "latin_1")
            else:
                self._encoding = self._parent._text_encoding if self._parent is not None else "latin_1"
        return self._encoding

    def _pixel_representation(self) -> int | None:
        ds: HeaderDataset | None = self
        while ds is not None:
            element = ds._elements.get(_PIXREP_TAG)
            if element is not None:
                value = element.value
                if isinstance(value, int):
                    return value
            ds = ds._parent
        return None

    def __repr__(self) -> str:
        return f"<HeaderDataset {len(self)} elements>"


# --------------------------------------------------------------------------- value conversion
def _split_text(text: str) -> Any:
    parts = text.split("\\")
    return parts[0] if len(parts) == 1 else parts


def _ds_value(s: str) -> Any:
    if s == "":
        return ""
    return float(s)  # ValueError handled by the caller (pydicom retries as SH)


def _is_value(s: str) -> Any:
    if s == "":
        return ""
    try:
        return int(s)
    except ValueError:
        f = float(s)
        if f != f or f in (float("inf"), float("-inf")):
            raise
        return int(f) if f.is_integer() else f


def _decode(raw: bytes, codec: str) -> str:
    try:
        return raw.decode(codec)
    except UnicodeError:
        return raw.decode(codec, "replace")


def _convert(element: HeaderElement) -> Any:
    """Bytes -> value as pydicom 3's converters (values.py) with default config."""
    vr = element.VR
    if element._end == element._start and not element.is_undefined_length:
        if vr == "SQ":
            return []
        if vr in _STR_VRS:
            return ""
        return None
    if vr == "SQ":
        return _read_items(element)
    raw = element._buf.data[element._start:element._end]
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize("=" + fmt)
        if len(raw) % size:
            raise HeaderError(f"{element.tag!r} {vr} value of {len(raw)} bytes is not a multiple of {size}")
        values = list(struct.unpack(f"{element._buf.prefix}{len(raw) // size}{fmt}", raw))
        if element.tag in _LUT_DESCRIPTORS and len(values) > 1 and values[0] < 0:
            values[0] += 65536
        return values[0] if len(values) == 1 else values
    if vr in _BYTES_VRS:
        return raw
    try:
        return _convert_text(element, vr, raw)
    except ValueError:
        pass
    # pydicom retries a failed conversion as SH (then others): the text, split and right-stripped
    return _split_and_strip(_decode(raw, element._parent._text_encoding))


def _split_and_strip(text: str) -> Any:
    parts = [p.rstrip("\0 ") for p in text.split("\\")]
    return parts[0] if len(parts) == 1 else parts


def _convert_text(element: HeaderElement, vr: str, raw: bytes) -> Any:
    if vr in ("SH", "LO", "UC"):
        return _split_and_strip(_decode(raw, element._parent._text_encoding))
    if vr in ("ST", "LT", "UT"):
        return _decode(raw, element._parent._text_encoding).rstrip("\0 ")
    if vr == "PN":
        return _split_text(_decode(raw.rstrip(b"\0 "), element._parent._text_encoding))
    if vr == "DS":
        text = raw.decode("latin_1").strip().rstrip(" \0")
        parts = text.split("\\")
        return _ds_value(parts[0]) if len(parts) == 1 else [_ds_value(p) for p in parts]
    if vr == "IS":
        parts = raw.decode("latin_1").rstrip(" \0").split("\\")
        return _is_value(parts[0]) if len(parts) == 1 else [_is_value(p) for p in parts]
    if vr == "AE":
        parts = [p.strip() for p in raw.decode("latin_1").split("\\")]
        return parts[0] if len(parts) == 1 else parts
    if vr == "UI":
        return _split_text(raw.decode("latin_1").rstrip("\0 "))
    if vr == "UR":
        return raw.decode("latin_1").rstrip()
    if vr == "AT":
        n = len(raw) // 4
        if n == 0:
            raise ValueError("AT value shorter than 4 bytes")
        vals = struct.unpack(f"{element._buf.prefix}{2 * n}H", raw[:4 * n])
        tags = [Tag(vals[2 * i] << 16 | vals[2 * i + 1]) for i in range(n)]
        return tags[0] if len(raw) == 4 else tags
    if vr in ("AS", "CS", "DA", "DT", "TM"):
        return _split_text(raw.decode("latin_1").rstrip(" \0"))
    return raw  # a VR pydicom has no converter for: keep the bytes


_AMBIGUOUS = frozenset(("US or SS", "OB or OW", "US or OW", "US or SS or OW"))


def _resolve_ambiguous(element: HeaderElement) -> None:
    """Settle a dictionary VR with two choices as pydicom's correct_ambiguous_vr_element (PS3.5 A.1)."""
    ds = element._parent
    tag = element.tag
    if element.VR == "US or OW" and tag == 0x00283006:  # LUTData: US when LUTDescriptor says 1 entry
        desc = ds.get("LUTDescriptor")
        first = desc[0] if isinstance(desc, list) and desc else desc
        element.VR = "US" if first == 1 else "OW"
    elif element.VR == "US or SS" and (tag >> 16 != 0x7FE0):
        pr = ds._pixel_representation()
        element.VR = "SS" if pr not in (None, 0) else "US"
    elif element.VR in ("OB or OW", "US or SS or OW"):
        element.VR = "OW" if element._implicit else "OB"
    else:
        return
    element._value = _UNSET


# --------------------------------------------------------------------------- parsing
def _u16(buf: _Buffer, pos: int) -> int:
    return struct.unpack_from(buf.prefix + "H", buf.data, pos)[0]


def _is_implicit(data: bytes, pos: int, assumed: bool) -> bool:
    """pydicom's _is_implicit_vr: two uppercase letters where an explicit VR would be (PS3.5 7.1.2)."""
    if pos + 6 > len(data):
        return assumed
    a, b = data[pos + 4], data[pos + 5]
    return not (0x40 < a < 0x5B and 0x40 < b < 0x5B)


def _element_vr(tag: int, vr: str | None, ds: HeaderDataset, length: int) -> str:
    """VR of an element: the explicit one, else from the dictionaries (pydicom hooks.raw_element_vr)."""
    if vr is None or (vr == "UN" and ((tag >> 16) & 1 or length < 0xFFFF)):
        entry = _dictionary_entry(tag)
        if entry is not None:
            return entry[0]
        if (tag >> 16) & 1:
            if 0x10 <= (tag & 0xFFFF) <= 0xFF:
                return "LO"
            if tag & 0xFF00:
                creator = ds._elements.get(tag & 0xFFFF0000 | (tag & 0xFFFF) >> 8)
                if creator is not None:
                    name = creator.value
                    if isinstance(name, str) and name:
                        found = _private_vr(name, tag)
                        if found is not None:
                            return found
            return "UN"
        if vr is None:
            return "UL" if tag & 0xFFFF == 0 else "UN"
    return vr


def _dictionary_vr(tag: int) -> str | None:
    """The standard dictionary's VR of a tag, None if it has none (the compiled walk asks this of an
    implicit-VR element of undefined length)."""
    entry = _dictionary_entry(tag)
    return None if entry is None else entry[0]


try:  # the element walk compiled (setup.py builds it where a C compiler is; optional)
    from sitebench.qc._dicom_scan import scan as _scan
except ImportError:  # pragma: no cover - an install without a compiler walks in Python
    _scan = None


def _parse(buf: _Buffer, pos: int, end: int, implicit: bool, ds: HeaderDataset, depth: int,
           in_item: bool, stop_pixels: bool, wanted: "frozenset[int] | None", last_wanted: int,
           size: int) -> int:
    """Read the elements of one data set from ``pos`` to ``end`` (PS3.5 7.1) into ``ds``; return the
    position after it (after its item delimiter when ``in_item`` and undefined length)."""
    data = buf.data
    little = buf.little
    elements = ds._elements
    if _scan is not None:  # the same walk compiled; None where Python must redo it (it raises there)
        scanned = _scan(data, pos, end, little, implicit, depth, in_item, stop_pixels, wanted, last_wanted, size,
                        _dictionary_vr)
        if scanned is not None:
            for tag, vr, start, stop, undefined, length in scanned[1]:
                if vr is None or vr == "UN":  # else _element_vr keeps the explicit VR as it is
                    vr = _element_vr(tag, vr, ds, length)
                elements[tag] = HeaderElement(tag, vr, buf, start, stop, ds, implicit, undefined)
            return scanned[0]
    unpack_from = struct.unpack_from
    hdr = "<HH" if little else ">HH"
    # one unpack per element header: tag, VR bytes and short length (explicit) or tag and length
    explicit_header = (_EXPLICIT_LE if little else _EXPLICIT_BE).unpack_from
    implicit_header = (_IMPLICIT_LE if little else _IMPLICIT_BE).unpack_from
    ulong = (_ULONG_LE if little else _ULONG_BE).unpack_from
    short_vrs, long_vrs = _SHORT_VRS, _LONG_VRS
    while pos + 8 <= end:
        if implicit:
            group, elem, length = implicit_header(data, pos)
            tag = group << 16 | elem
            if tag == _ITEM_END:
                return pos + 8
            vr = None
            start = pos + 8
        else:
            group, elem, raw_vr, length = explicit_header(data, pos)
            tag = group << 16 | elem
            if tag == _ITEM_END:
                return pos + 8
            if raw_vr in short_vrs:
                vr = raw_vr
                start = pos + 8
            elif raw_vr in long_vrs:
                if pos + 12 > size:
                    raise HeaderError(f"truncated element header of {Tag(tag)!r}")
                if pos + 12 > end:
                    return end
                vr = raw_vr
                length = ulong(data, pos + 8)[0]
                start = pos + 12
            elif not (b"AA" <= raw_vr <= b"ZZ"):  # pydicom assume_implicit_vr_switch
                vr = None
                length = ulong(data, pos + 4)[0]
                start = pos + 8
            else:  # unknown VR of two letters: 2-byte length, as pydicom
                vr = raw_vr
                start = pos + 8
        if depth == 0:
            if stop_pixels and tag in _PIXEL_TAGS:
                return pos
            if wanted is not None and tag > last_wanted and tag != _CHARSET_TAG:
                return pos
        keep = wanted is None or depth > 0 or tag in wanted
        if length != _UNDEFINED:
            stop = start + length
            if not keep:
                pos = stop
                continue
            if vr is not None:
                vr = vr.decode("latin_1")
            vr = _element_vr(tag, vr, ds, length)
            elements[tag] = HeaderElement(tag, vr, buf, start, min(stop, end, size), ds, implicit)
            pos = stop
            continue
        # undefined length (PS3.5 7.1.3): a sequence, an encapsulated value, or UN holding a sequence
        if vr is not None:
            vr = vr.decode("latin_1")
        if vr == "UN":
            vr = "SQ"
        if vr is None:
            entry = _dictionary_entry(tag)
            if entry is not None:
                vr = entry[0]
            elif start + 4 <= size and unpack_from(hdr, data, start) == (0xFFFE, 0xE000):
                vr = "SQ"
        if vr == "SQ":
            if depth >= MAX_DEPTH:
                raise HeaderError(f"sequences nested deeper than {MAX_DEPTH}")
            stop = _skip_sequence(buf, start, end, implicit, depth + 1, size)
            if keep:
                element = HeaderElement(tag, "SQ", buf, start, stop, ds, implicit, undefined=True)
                elements[tag] = element
            pos = stop
            continue
        found = data.find(b"\xfe\xff\xdd\xe0" if little else b"\xff\xfe\xe0\xdd", start, end)
        while found >= 0 and (found - start) % 2:  # delimiter tags sit on even offsets
            found = data.find(b"\xfe\xff\xdd\xe0" if little else b"\xff\xfe\xe0\xdd", found + 1, end)
        if found < 0:
            return end  # pydicom: EOFError, caught; the data set ends here
        if keep:
            vr = _element_vr(tag, vr, ds, 0)
            elements[tag] = HeaderElement(tag, vr, buf, start, found, ds, implicit, undefined=True)
        pos = found + 8
    return end if pos < end or not in_item else pos


def _skip_sequence(buf: _Buffer, pos: int, end: int, implicit: bool, depth: int, size: int) -> int:
    """Position after an undefined-length sequence's delimiter (PS3.5 7.5.2), items parsed and dropped."""
    data = buf.data
    hdr = "<HHL" if buf.little else ">HHL"
    while True:
        if pos + 8 > min(end, size):
            raise HeaderError("sequence of undefined length runs past the end of the data")
        group, elem, length = struct.unpack_from(hdr, data, pos)
        pos += 8
        if group == 0xFFFE and elem == 0xE0DD:
            return pos
        if length == _UNDEFINED:
            item_implicit = implicit or _is_implicit(data, pos, implicit)
            pos = _skip_item(buf, pos, end, item_implicit, depth, size)
        else:
            pos += length


def _skip_item(buf: _Buffer, pos: int, end: int, implicit: bool, depth: int, size: int) -> int:
    """Position after an undefined-length item's delimiter, walking its elements without keeping
    any: a sequence nobody asked for (a vendor's private per-frame groups, say) costs no objects."""
    data = buf.data
    little = buf.little
    unpack_from = struct.unpack_from
    implicit_header = (_IMPLICIT_LE if little else _IMPLICIT_BE).unpack_from
    explicit_header = (_EXPLICIT_LE if little else _EXPLICIT_BE).unpack_from
    ulong = (_ULONG_LE if little else _ULONG_BE).unpack_from
    short_vrs, long_vrs = _SHORT_VRS, _LONG_VRS
    item_hdr = (0xFFFE, 0xE000)
    limit = min(end, size)
    while pos + 8 <= limit:
        if implicit:
            group, elem, length = implicit_header(data, pos)
            if group == 0xFFFE and elem == 0xE00D:
                return pos + 8
            start = pos + 8
        else:
            group, elem, raw_vr, length = explicit_header(data, pos)
            if group == 0xFFFE and elem == 0xE00D:
                return pos + 8
            if raw_vr in short_vrs:
                start = pos + 8
            elif raw_vr in long_vrs:
                if pos + 12 > limit:
                    break
                length, start = ulong(data, pos + 8)[0], pos + 12
            elif b"AA" <= raw_vr <= b"ZZ":
                start = pos + 8
            else:  # implicit VR inside an explicit item (pydicom assume_implicit_vr_switch)
                length, start = ulong(data, pos + 4)[0], pos + 8
        if length != _UNDEFINED:
            pos = start + length
            continue
        if depth >= MAX_DEPTH:
            raise HeaderError(f"sequences nested deeper than {MAX_DEPTH}")
        if start + 4 <= size and unpack_from("<HH" if little else ">HH", data, start) == item_hdr:
            pos = _skip_sequence(buf, start, end, implicit, depth + 1, size)  # a sequence (or fragments)
            continue
        found = data.find(b"\xfe\xff\xdd\xe0" if little else b"\xff\xfe\xe0\xdd", start, end)
        while found >= 0 and (found - start) % 2:
            found = data.find(b"\xfe\xff\xdd\xe0" if little else b"\xff\xfe\xe0\xdd", found + 1, end)
        if found < 0:
            return end
        pos = found + 8
    return end


def _read_items(element: HeaderElement) -> list[HeaderDataset]:
    """Parse a sequence's items on first access (PS3.5 7.5): defined- or undefined-length items."""
    buf, parent = element._buf, element._parent
    depth = 1
    p = parent
    while p._parent is not None:
        depth += 1
        p = p._parent
    if depth > MAX_DEPTH:
        raise HeaderError(f"sequences nested deeper than {MAX_DEPTH}")
    data = buf.data
    hdr = "<HHL" if buf.little else ">HHL"
    pos, end = element._start, element._end
    size = len(data)
    items: list[HeaderDataset] = []
    while element.is_undefined_length or pos < end:
        if pos + 8 > size or (not element.is_undefined_length and pos + 8 > end):
            raise HeaderError(f"sequence {element.tag!r} has a truncated item")
        group, elem, length = struct.unpack_from(hdr, data, pos)
        pos += 8
        if group == 0xFFFE and elem == 0xE0DD:
            break
        item = HeaderDataset(parent)
        item.is_little_endian = buf.little
        implicit = element._implicit or _is_implicit(data, pos, element._implicit)
        item.is_implicit_VR = implicit
        if length == _UNDEFINED:
            pos = _parse(buf, pos, size if element.is_undefined_length else end, implicit, item, depth, True,
                         False, None, 0, size)
        else:
            stop = pos + length
            _parse(buf, pos, min(stop, size), implicit, item, depth, False, False, None, 0, size)
            pos = stop
        items.append(item)
        if element.is_undefined_length and pos >= end:
            break
    return items


def _read_meta(data: bytes, pos: int) -> tuple[HeaderDataset, int]:
    """File meta group 0002, explicit VR LE (PS3.10 7.1), until the first element of another group."""
    meta = HeaderDataset()
    buf = _Buffer(data, True)
    end = len(data)
    while pos + 8 <= end:
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 2:
            break
        pos = _parse_meta_element(buf, pos, meta)
    return meta, pos


def _parse_meta_element(buf: _Buffer, pos: int, meta: HeaderDataset) -> int:
    data = buf.data
    size = len(data)
    tag = struct.unpack_from("<L", data, pos)[0]
    tag = (tag & 0xFFFF) << 16 | tag >> 16
    raw_vr = data[pos + 4:pos + 6]
    if raw_vr in _LONG_VRS:
        if pos + 12 > size:
            raise HeaderError("truncated file meta element")
        length, start, vr = struct.unpack_from("<L", data, pos + 8)[0], pos + 12, raw_vr.decode()
    elif b"AA" <= raw_vr <= b"ZZ":
        length, start, vr = struct.unpack_from("<H", data, pos + 6)[0], pos + 8, raw_vr.decode("latin_1")
    else:  # implicit VR meta (pydicom retries so, issue #503)
        length, start, vr = struct.unpack_from("<L", data, pos + 4)[0], pos + 8, None
    if length == _UNDEFINED:
        raise HeaderError("file meta element of undefined length")
    vr = _element_vr(tag, vr, meta, length)
    meta._elements[tag] = HeaderElement(tag, vr, buf, start, min(start + length, size), meta, False)
    return start + length


_WANTED_CACHE: dict[tuple, tuple[frozenset[int], int]] = {}


def _wanted_tags(specific_tags: Iterable[Any]) -> tuple[frozenset[int], int]:
    """The tags to keep and the highest of them; the same request (every file of a series asks the
    same) is resolved once."""
    key = tuple(specific_tags) if not isinstance(specific_tags, tuple) else specific_tags
    try:
        cached = _WANTED_CACHE.get(key)
    except TypeError:  # an unhashable entry: resolve without the cache
        wanted = _resolve_wanted(key)
        return wanted, max(wanted)
    if cached is None:
        wanted = _resolve_wanted(key)
        cached = _WANTED_CACHE[key] = (wanted, max(wanted))
        if len(_WANTED_CACHE) > 64:
            _WANTED_CACHE.pop(next(iter(_WANTED_CACHE)))
    return cached


def _resolve_wanted(specific_tags: Iterable[Any]) -> frozenset[int]:
    wanted = set()
    for key in specific_tags:
        try:
            tag = _to_tag(key)
        except KeyError:
            raise HeaderError(f"unknown tag or keyword {key!r}") from None
        wanted.add(tag)
        if (tag >> 16) & 1 and tag & 0xFF00:  # private element: keep its block's creator (PS3.5 7.8.1)
            wanted.add(tag & 0xFFFF0000 | (tag & 0xFFFF) >> 8)
    wanted.add(_CHARSET_TAG)
    return frozenset(wanted)


def read_header(path: str | os.PathLike, specific_tags: Iterable[Any] | None = None,
                stop_before_pixels: bool = True) -> HeaderDataset:
    """Read a DICOM file's header (PS3.10 7.1) into a :class:`HeaderDataset`.

    ``specific_tags`` (keywords or tags) keeps only those top-level elements (and the private
    creators of requested private elements, and SpecificCharacterSet); the others are skipped
    undecoded and reading stops after the highest requested tag. Raises :class:`HeaderError`
    where pydicom's ``dcmread(force=False)`` raises, and on damage it cannot read past.
    """
    try:
        # unbuffered, and no more than the file holds: a buffered read of CHUNK allocates (and maps)
        # the whole megabyte for every file, which cost more than the rest of reading a small header
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            data = _read_exactly(f, min(size, CHUNK)) if size > 0 else f.read(CHUNK)  # 0: a pipe, say
            if len(data) == CHUNK and size > CHUNK:
                try:
                    return _read_bytes(data, specific_tags, stop_before_pixels, path, complete=False)
                except _NeedMore:
                    data += _read_exactly(f, min(size, MAX_FILE) - CHUNK)
    except OSError as exc:
        raise HeaderError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _read_bytes(data, specific_tags, stop_before_pixels, path, complete=True)


def _read_exactly(f: Any, n: int) -> bytes:
    """``n`` bytes (fewer only at the end of the file): a raw read may return less than asked."""
    data = f.read(n)
    if len(data) < n:
        parts = [data]
        got = len(data)
        while got < n:
            more = f.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


class _NeedMore(Exception):
    """The header runs past the first chunk: read the rest of the file and start again."""


def _read_bytes(data: bytes, specific_tags: Iterable[Any] | None, stop_before_pixels: bool,
                path: Any, complete: bool) -> HeaderDataset:
    try:
        return _read(data, specific_tags, stop_before_pixels, path, complete)
    except (HeaderError, _NeedMore):
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError, zlib.error, RecursionError,
            UnicodeError, MemoryError) as exc:
        raise HeaderError(f"damaged DICOM header: {type(exc).__name__}: {str(exc)[:120]}") from None


def _read(data: bytes, specific_tags: Iterable[Any] | None, stop_before_pixels: bool, path: Any,
          complete: bool) -> HeaderDataset:
    if len(data) < 132 or data[128:132] != b"DICM":
        raise HeaderError("File is missing DICOM File Meta Information header or the 'DICM' prefix "
                          "is missing from the header")
    meta, pos = _read_meta(data, 132)
    if not complete and pos + 8 > len(data):
        raise _NeedMore
    ts_element = meta._elements.get(0x00020010)
    ts = ts_element.value if ts_element is not None else None
    ts = ts[0] if isinstance(ts, list) else ts
    implicit, little = True, True
    peek = data[pos:pos + 6]
    if len(peek) == 0:
        pass
    elif ts is None:  # no transfer syntax: guess from the first element, as pydicom (issue 258)
        if len(peek) >= 6 and peek[4:6] in _SHORT_VRS | _LONG_VRS:
            implicit = False
            little = struct.unpack_from("<H", peek, 0)[0] < 1024
        elif len(peek) < 6:
            raise HeaderError("truncated data set")
    elif ts == _IMPLICIT_LE:
        pass
    elif ts == _BIG_ENDIAN:
        implicit, little = False, False
    elif ts in _DEFLATED:
        if not complete:
            raise _NeedMore
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        body = inflater.decompress(data[pos:], MAX_INFLATED)
        if inflater.unconsumed_tail:
            raise HeaderError("deflated data set larger than the reader accepts")
        if not inflater.eof:
            raise HeaderError("deflated data set is truncated")
        data, pos, implicit = body, 0, False
    else:  # explicit VR LE and every encapsulated syntax (PS3.5 A.4)
        implicit = False
    buf = _Buffer(data, little)
    size = len(data)
    ds = HeaderDataset()
    ds.file_meta = meta
    ds.filename = str(path)
    if pos < size:
        first_tag = (struct.unpack_from("<HH" if little else ">HH", data, pos) if pos + 4 <= size else (0, 0))
        first = first_tag[0] << 16 | first_tag[1]
        if not (stop_before_pixels and first in _PIXEL_TAGS):
            implicit = _is_implicit(data, pos, implicit)
    ds.is_little_endian, ds.is_implicit_VR = little, implicit
    wanted, last = _wanted_tags(specific_tags) if specific_tags else (None, 0)
    if not complete:
        buf_end = _parse_checked(buf, pos, implicit, ds, stop_before_pixels, wanted, last)
        return buf_end
    _parse(buf, pos, size, implicit, ds, 0, False, stop_before_pixels, wanted, last, size)
    return ds


def _parse_checked(buf: _Buffer, pos: int, implicit: bool, ds: HeaderDataset, stop_pixels: bool,
                   wanted: "frozenset[int] | None", last: int) -> HeaderDataset:
    """Parse a first chunk: if the data set (or any element of it) runs past it, ask for the rest."""
    size = len(buf.data)
    try:
        stopped = _parse(buf, pos, size, implicit, ds, 0, False, stop_pixels, wanted, last, size)
    except HeaderError:
        raise _NeedMore from None
    if stopped + 12 > size:
        raise _NeedMore
    for element in ds._elements.values():
        if element._end >= size - 8:
            raise _NeedMore
    return ds
