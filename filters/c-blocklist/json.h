// A small pull reader for the JSON config a filter's `init` receives: just
// objects, arrays, strings and integers, read in order, with a message on
// the first error. No allocation. Header-only: include it from one file.

#ifndef SLUICEGATE_JSON_H
#define SLUICEGATE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define JSON_MAX_DEPTH 16

typedef struct {
    const char *start, *p, *end;
    bool failed;
    char error[160];
    int depth;
    bool first[JSON_MAX_DEPTH];  // no member read yet at this depth
} json_t;

static bool json_fail(json_t *j, const char *what) {
    if (!j->failed) {
        j->failed = true;
        snprintf(j->error, sizeof j->error, "%s at byte %zu", what, (size_t)(j->p - j->start));
    }
    return false;
}

static void json_init(json_t *j, const char *text, size_t len) {
    j->start = text;
    j->p = text;
    j->end = text + len;
    j->failed = false;
    j->error[0] = '\0';
    j->depth = 0;
}

static void json_ws(json_t *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static bool json_eat(json_t *j, char c) {
    json_ws(j);
    if (j->p < j->end && *j->p == c) {
        j->p++;
        return true;
    }
    return false;
}

static bool json_open(json_t *j, char c, const char *what) {
    if (j->failed) return false;
    if (!json_eat(j, c)) return json_fail(j, what);
    if (j->depth == JSON_MAX_DEPTH) return json_fail(j, "nested too deep");
    j->first[j->depth++] = true;
    return true;
}

static bool json_begin_object(json_t *j) { return json_open(j, '{', "expected an object"); }
static bool json_begin_array(json_t *j) { return json_open(j, '[', "expected a list"); }

// Before each member: is there one (`*more`), or did the container close?
static bool json_member(json_t *j, char close, bool *more) {
    *more = false;
    if (j->failed || j->depth == 0) return false;
    if (json_eat(j, close)) {
        j->depth--;
        return true;
    }
    if (!j->first[j->depth - 1] && !json_eat(j, ',')) return json_fail(j, "expected ',' or a closing bracket");
    j->first[j->depth - 1] = false;
    *more = true;
    return true;
}

// A string into `out` (NUL-terminated; \uXXXX beyond ASCII is refused).
static bool json_string(json_t *j, char *out, size_t cap) {
    if (j->failed) return false;
    if (!json_eat(j, '"')) return json_fail(j, "expected a string");
    size_t n = 0;
    while (j->p < j->end && *j->p != '"') {
        char c = *j->p++;
        if (c == '\\') {
            if (j->p >= j->end) break;
            char e = *j->p++;
            switch (e) {
                case '"': case '\\': case '/': c = e; break;
                case 'n': c = '\n'; break;
                case 't': c = '\t'; break;
                case 'r': c = '\r'; break;
                case 'b': c = '\b'; break;
                case 'f': c = '\f'; break;
                case 'u': {
                    unsigned v = 0;
                    for (int i = 0; i < 4; i++) {
                        if (j->p >= j->end) return json_fail(j, "bad \\u escape");
                        char h = *j->p++;
                        v <<= 4;
                        if (h >= '0' && h <= '9') v |= (unsigned)(h - '0');
                        else if (h >= 'a' && h <= 'f') v |= (unsigned)(h - 'a' + 10);
                        else if (h >= 'A' && h <= 'F') v |= (unsigned)(h - 'A' + 10);
                        else return json_fail(j, "bad \\u escape");
                    }
                    if (v == 0 || v > 0x7f) return json_fail(j, "only ASCII \\u escapes are supported");
                    c = (char)v;
                    break;
                }
                default: return json_fail(j, "bad escape");
            }
        }
        if (n + 1 >= cap) return json_fail(j, "string too long");
        out[n++] = c;
    }
    if (j->p >= j->end) return json_fail(j, "unterminated string");
    j->p++;
    out[n] = '\0';
    return true;
}

// The next object key (`*more` false when the object closed).
static bool json_next_key(json_t *j, char *key, size_t cap, bool *more) {
    if (!json_member(j, '}', more) || !*more) return !j->failed;
    if (!json_string(j, key, cap)) return false;
    if (!json_eat(j, ':')) return json_fail(j, "expected ':'");
    return true;
}

// Is there a next list item (`*more`)?
static bool json_next_item(json_t *j, bool *more) { return json_member(j, ']', more); }

static bool json_int(json_t *j, long long *out) {
    if (j->failed) return false;
    json_ws(j);
    bool neg = j->p < j->end && *j->p == '-';
    if (neg) j->p++;
    if (j->p >= j->end || *j->p < '0' || *j->p > '9') return json_fail(j, "expected an integer");
    long long v = 0;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        if (v > 1000000000000LL) return json_fail(j, "integer too large");
        v = v * 10 + (*j->p++ - '0');
    }
    if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E')) return json_fail(j, "expected an integer");
    *out = neg ? -v : v;
    return true;
}

// Nothing but whitespace may follow the document.
static bool json_end(json_t *j) {
    if (j->failed) return false;
    json_ws(j);
    if (j->p != j->end || j->depth != 0) return json_fail(j, "trailing data");
    return true;
}

#endif
