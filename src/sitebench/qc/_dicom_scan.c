/* The element walk of sitebench.qc.dicom_header._parse, compiled.
 *
 * Why: the pure-Python walk costs about 1 us an element, and a vendor's header holds hundreds
 * of elements the parameters never read (Philips' private groups, GE's, the per-frame
 * sequences), so the walk alone is most of `qc inspect`'s time. This module does the same walk
 * (PS3.5 7.1 data elements, 7.5 sequences, skipped undecoded) and returns only what the Python
 * side keeps: one tuple per element it would have made a HeaderElement of.
 *
 * It is an accelerator, never a second parser: on anything but the plain path (damage that the
 * Python walk raises on, nesting past MAX_DEPTH) it returns None and the caller runs the Python
 * walk, which raises or reads exactly as before. tests/test_dicom_header.py reads every shared
 * DICOM and the fuzz corpus both ways and requires the same data sets.
 *
 * scan(data, pos, end, little, implicit, depth, in_item, stop_pixels, wanted, last_wanted, size,
 *      dictionary_vr) -> (next_pos, [(tag, vr or None, start, stop, undefined, length), ...]) | None
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_DEPTH 64
#define UNDEFINED 0xFFFFFFFFu
#define ITEM 0xFFFEE000u
#define ITEM_END 0xFFFEE00Du
#define SEQ_END 0xFFFEE0DDu
#define CHARSET_TAG 0x00080005u

typedef struct {
    const unsigned char *data;
    Py_ssize_t size;
    int little;
} Buf;

/* status of the skip helpers: >= 0 a position, FALLBACK: let Python redo it (it raises there) */
#define FALLBACK (-1)
#define PYERR (-2)

static inline unsigned int u16(const Buf *b, Py_ssize_t p) {
    const unsigned char *d = b->data + p;
    return b->little ? (unsigned int)(d[0] | d[1] << 8) : (unsigned int)(d[1] | d[0] << 8);
}

static inline unsigned long u32(const Buf *b, Py_ssize_t p) {
    const unsigned char *d = b->data + p;
    if (b->little)
        return (unsigned long)d[0] | (unsigned long)d[1] << 8 | (unsigned long)d[2] << 16 | (unsigned long)d[3] << 24;
    return (unsigned long)d[3] | (unsigned long)d[2] << 8 | (unsigned long)d[1] << 16 | (unsigned long)d[0] << 24;
}

/* PS3.5 6.2 VRs with a 2-byte length, and (Table 7.1-1) those with a reserved field and 4-byte length */
static const char SHORT_VRS[][3] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT",
                                    "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"};
static const char LONG_VRS[][3] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"};
static unsigned char VR_KIND[65536]; /* 0 unknown, 1 short, 2 long; index a << 8 | b */

static void init_vr_kinds(void) {
    size_t i;
    for (i = 0; i < sizeof SHORT_VRS / sizeof SHORT_VRS[0]; i++)
        VR_KIND[(unsigned char)SHORT_VRS[i][0] << 8 | (unsigned char)SHORT_VRS[i][1]] = 1;
    for (i = 0; i < sizeof LONG_VRS / sizeof LONG_VRS[0]; i++)
        VR_KIND[(unsigned char)LONG_VRS[i][0] << 8 | (unsigned char)LONG_VRS[i][1]] = 2;
}

/* b"AA" <= vr <= b"ZZ", as bytes compare */
static inline int two_letters(unsigned char a, unsigned char b) {
    if (a < 'A' || a > 'Z') return 0;
    if (a == 'A' && b < 'A') return 0;
    if (a == 'Z' && b > 'Z') return 0;
    return 1;
}

static inline int is_implicit_at(const Buf *b, Py_ssize_t pos, int assumed) {
    if (pos + 6 > b->size) return assumed;
    unsigned char a = b->data[pos + 4], c = b->data[pos + 5];
    return !(0x40 < a && a < 0x5B && 0x40 < c && c < 0x5B);
}

/* first sequence delimiter tag at an even offset from start, in [start, end); -1 if none */
static Py_ssize_t find_seq_end(const Buf *b, Py_ssize_t start, Py_ssize_t end) {
    const unsigned char pat_le[4] = {0xFE, 0xFF, 0xDD, 0xE0}, pat_be[4] = {0xFF, 0xFE, 0xE0, 0xDD};
    const unsigned char *pat = b->little ? pat_le : pat_be;
    Py_ssize_t p = start;
    if (end > b->size) end = b->size;
    while (p + 4 <= end) {
        const unsigned char *hit = memchr(b->data + p, pat[0], (size_t)(end - 4 + 1 - p));
        if (hit == NULL) return -1;
        Py_ssize_t at = hit - b->data;
        if (memcmp(hit, pat, 4) == 0 && (at - start) % 2 == 0) return at;
        p = at + 1;
    }
    return -1;
}

static Py_ssize_t skip_item(const Buf *b, Py_ssize_t pos, Py_ssize_t end, int implicit, int depth);

/* _skip_sequence: position after an undefined-length sequence's delimiter */
static Py_ssize_t skip_sequence(const Buf *b, Py_ssize_t pos, Py_ssize_t end, int implicit, int depth) {
    Py_ssize_t limit = end < b->size ? end : b->size;
    for (;;) {
        if (pos + 8 > limit) return FALLBACK; /* Python raises: runs past the end */
        unsigned int group = u16(b, pos), elem = u16(b, pos + 2);
        unsigned long length = u32(b, pos + 4);
        pos += 8;
        if (group == 0xFFFE && elem == 0xE0DD) return pos;
        if (length == UNDEFINED) {
            int item_implicit = implicit || is_implicit_at(b, pos, implicit);
            pos = skip_item(b, pos, end, item_implicit, depth);
            if (pos < 0) return pos;
        } else {
            pos += (Py_ssize_t)length;
        }
    }
}

/* _skip_item: position after an undefined-length item's delimiter, elements walked and dropped */
static Py_ssize_t skip_item(const Buf *b, Py_ssize_t pos, Py_ssize_t end, int implicit, int depth) {
    Py_ssize_t limit = end < b->size ? end : b->size;
    while (pos + 8 <= limit) {
        unsigned int group = u16(b, pos), elem = u16(b, pos + 2);
        unsigned long length;
        Py_ssize_t start;
        if (group == 0xFFFE && elem == 0xE00D) return pos + 8;
        if (implicit) {
            length = u32(b, pos + 4);
            start = pos + 8;
        } else {
            unsigned char a = b->data[pos + 4], c = b->data[pos + 5];
            int kind = VR_KIND[a << 8 | c];
            if (kind == 1) {
                length = u16(b, pos + 6);
                start = pos + 8;
            } else if (kind == 2) {
                if (pos + 12 > limit) break;
                length = u32(b, pos + 8);
                start = pos + 12;
            } else if (two_letters(a, c)) {
                length = u16(b, pos + 6);
                start = pos + 8;
            } else {
                length = u32(b, pos + 4);
                start = pos + 8;
            }
        }
        if (length != UNDEFINED) {
            pos = start + (Py_ssize_t)length;
            continue;
        }
        if (depth >= MAX_DEPTH) return FALLBACK;
        if (start + 4 <= b->size && u16(b, start) == 0xFFFE && u16(b, start + 2) == 0xE000) {
            pos = skip_sequence(b, start, end, implicit, depth + 1);
            if (pos < 0) return pos;
            continue;
        }
        Py_ssize_t found = find_seq_end(b, start, end);
        if (found < 0) return end;
        pos = found + 8;
    }
    return end;
}

static PyObject *VR_SQ;

static int append(PyObject *out, unsigned long tag, PyObject *vr, Py_ssize_t start, Py_ssize_t stop, int undefined,
                  unsigned long length) {
    PyObject *row = Py_BuildValue("(kOnnOk)", tag, vr, start, stop, undefined ? Py_True : Py_False, length);
    if (row == NULL) return -1;
    int rc = PyList_Append(out, row);
    Py_DECREF(row);
    return rc;
}

static PyObject *vr_text(unsigned char a, unsigned char c) {
    char two[2] = {(char)a, (char)c};
    return PyUnicode_DecodeLatin1(two, 2, NULL);
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, end, size;
    int little, implicit, depth, in_item, stop_pixels;
    PyObject *wanted, *dictionary_vr;
    unsigned long last_wanted;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnppippOknO", &view, &pos, &end, &little, &implicit, &depth, &in_item,
                          &stop_pixels, &wanted, &last_wanted, &size, &dictionary_vr))
        return NULL;
    Buf b = {(const unsigned char *)view.buf, view.len, little};
    if (size > view.len) size = view.len;
    b.size = size;
    if (end > size) end = size;
    PyObject *out = PyList_New(0);
    PyObject *result = NULL;
    if (out == NULL) goto done;
    int filter = wanted != Py_None;
    while (pos + 8 <= end) {
        unsigned int group = u16(&b, pos), elem = u16(&b, pos + 2);
        unsigned long tag = (unsigned long)group << 16 | elem, length;
        Py_ssize_t start;
        int have_vr = 0;
        unsigned char a = 0, c = 0;
        if (tag == ITEM_END) {
            pos += 8;
            goto finished;
        }
        if (implicit) {
            length = u32(&b, pos + 4);
            start = pos + 8;
        } else {
            a = b.data[pos + 4];
            c = b.data[pos + 5];
            int kind = VR_KIND[a << 8 | c];
            if (kind == 1) {
                have_vr = 1;
                length = u16(&b, pos + 6);
                start = pos + 8;
            } else if (kind == 2) {
                if (pos + 12 > size) goto fallback; /* Python: truncated element header */
                if (pos + 12 > end) {
                    pos = end;
                    goto finished_at;
                }
                have_vr = 1;
                length = u32(&b, pos + 8);
                start = pos + 12;
            } else if (!two_letters(a, c)) { /* implicit VR inside explicit (pydicom's switch) */
                length = u32(&b, pos + 4);
                start = pos + 8;
            } else { /* unknown VR of two letters, 2-byte length */
                have_vr = 1;
                length = u16(&b, pos + 6);
                start = pos + 8;
            }
        }
        if (depth == 0) {
            if (stop_pixels && (tag == 0x7FE00010u || tag == 0x7FE00009u || tag == 0x7FE00008u)) goto finished;
            if (filter && tag > last_wanted && tag != CHARSET_TAG) goto finished;
        }
        int keep = 1;
        if (filter && depth == 0) {
            PyObject *key = PyLong_FromUnsignedLong(tag);
            if (key == NULL) goto done;
            keep = PySet_Contains(wanted, key);
            Py_DECREF(key);
            if (keep < 0) goto done;
        }
        if (length != UNDEFINED) {
            Py_ssize_t stop = start + (Py_ssize_t)length;
            if (keep) {
                Py_ssize_t clamped = stop < end ? stop : end;
                PyObject *vr = have_vr ? vr_text(a, c) : (Py_INCREF(Py_None), Py_None);
                if (vr == NULL) goto done;
                int rc = append(out, tag, vr, start, clamped, 0, length);
                Py_DECREF(vr);
                if (rc < 0) goto done;
            }
            pos = stop;
            continue;
        }
        /* undefined length (PS3.5 7.1.3): a sequence, an encapsulated value, or UN holding a sequence */
        PyObject *vr;
        if (have_vr) {
            vr = (a == 'U' && c == 'N') ? (Py_INCREF(VR_SQ), VR_SQ) : vr_text(a, c);
            if (vr == NULL) goto done;
        } else {
            PyObject *key = PyLong_FromUnsignedLong(tag);
            if (key == NULL) goto done;
            vr = PyObject_CallOneArg(dictionary_vr, key);
            Py_DECREF(key);
            if (vr == NULL) goto done;
            if (vr == Py_None && start + 4 <= size && u16(&b, start) == 0xFFFE && u16(&b, start + 2) == 0xE000) {
                Py_DECREF(vr);
                vr = (Py_INCREF(VR_SQ), VR_SQ);
            }
        }
        int is_sq = vr != Py_None && PyUnicode_CompareWithASCIIString(vr, "SQ") == 0;
        if (is_sq) {
            if (depth >= MAX_DEPTH) {
                Py_DECREF(vr);
                goto fallback;
            }
            Py_ssize_t stop = skip_sequence(&b, start, end, implicit, depth + 1);
            if (stop < 0) {
                Py_DECREF(vr);
                goto fallback;
            }
            if (keep && append(out, tag, VR_SQ, start, stop, 1, 0) < 0) {
                Py_DECREF(vr);
                goto done;
            }
            Py_DECREF(vr);
            pos = stop;
            continue;
        }
        Py_ssize_t found = find_seq_end(&b, start, end);
        if (found < 0) {
            Py_DECREF(vr);
            pos = end; /* Python: EOFError caught, the data set ends here */
            goto finished_at;
        }
        if (keep && append(out, tag, vr, start, found, 1, 0) < 0) {
            Py_DECREF(vr);
            goto done;
        }
        Py_DECREF(vr);
        pos = found + 8;
    }
    pos = (pos < end || !in_item) ? end : pos;
    goto finished_at;
finished:
finished_at:
    result = Py_BuildValue("(nO)", pos, out);
    goto done;
fallback:
    result = (Py_INCREF(Py_None), Py_None);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Walk one data set's elements; the kept ones as tuples, or None to fall back."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dicom_scan",
                                    "Compiled element walk for sitebench.qc.dicom_header.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__dicom_scan(void) {
    init_vr_kinds();
    VR_SQ = PyUnicode_InternFromString("SQ");
    if (VR_SQ == NULL) return NULL;
    return PyModule_Create(&module);
}
