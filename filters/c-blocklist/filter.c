// c-blocklist: answers 403 to clients whose address is in a blocklist,
// written in C.
//
// Config (the `[filters.config.c-blocklist]` table, handed to `init` as JSON):
//
//   [filters.config.c-blocklist]
//   blocked = ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32"]  # IPv4/IPv6 networks or addresses
//   status = 403                                                # optional (100..=599)
//   message = "forbidden\n"                                     # optional body
//
// A request from a blocked address is answered locally and never reaches
// the upstream; every other request passes untouched. Matching is a linear
// scan of prefix compares: microseconds for hundreds of entries.
//
// Built with wit-bindgen c + clang (wasm32-wasi) + wasm-tools component new
// (see scripts/build-lang-filters.sh). Rule of the C bindings: every
// borrowed handle the host passes in must be dropped before returning
// (`*_drop_borrow`), or the call traps.

#include <arpa/inet.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "filter.h"
#include "json.h"

#define MAX_NETS 4096

typedef struct {
    int family;        // 4 or 6
    uint8_t addr[16];  // network bytes (4 used for IPv4)
    int prefix;        // bits
} net_t;

static net_t nets[MAX_NETS];
static size_t n_nets;
static uint16_t reply_status = 403;
static char reply_message[512] = "forbidden\n";

// Parse "a.b.c.d", "a.b.c.d/n", "x:y::z" or "x:y::z/n" into `out`.
static bool parse_net(const char *text, net_t *out) {
    char buf[64];
    size_t len = strlen(text);
    if (len == 0 || len >= sizeof buf) return false;
    memcpy(buf, text, len + 1);
    int prefix = -1;
    char *slash = strchr(buf, '/');
    if (slash) {
        *slash = '\0';
        const char *p = slash + 1;
        if (*p == '\0' || strlen(p) > 3) return false;
        prefix = 0;
        for (; *p; p++) {
            if (*p < '0' || *p > '9') return false;
            prefix = prefix * 10 + (*p - '0');
        }
    }
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, buf, out->addr) == 1) {
        out->family = 4;
        if (prefix < 0) prefix = 32;
        if (prefix > 32) return false;
    } else if (inet_pton(AF_INET6, buf, out->addr) == 1) {
        out->family = 6;
        if (prefix < 0) prefix = 128;
        if (prefix > 128) return false;
    } else {
        return false;
    }
    out->prefix = prefix;
    return true;
}

static bool in_net(const net_t *n, int family, const uint8_t *addr) {
    if (n->family != family) return false;
    int full = n->prefix / 8, rest = n->prefix % 8;
    if (memcmp(n->addr, addr, (size_t)full) != 0) return false;
    if (rest == 0) return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (n->addr[full] & mask) == (addr[full] & mask);
}

// The client address as the host gives it: "ip:port" or "[ip6]:port".
static bool parse_client(const char *text, size_t len, int *family, uint8_t *addr) {
    char buf[64];
    if (len == 0 || len >= sizeof buf) return false;
    memcpy(buf, text, len);
    buf[len] = '\0';
    char *host = buf;
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (!close) return false;
        *close = '\0';
        host = buf + 1;
    } else {
        char *colon = strrchr(buf, ':');
        if (colon) *colon = '\0';
    }
    if (inet_pton(AF_INET, host, addr) == 1) {
        *family = 4;
        return true;
    }
    if (inet_pton(AF_INET6, host, addr) == 1) {
        // An IPv4-mapped IPv6 address matches the IPv4 entries.
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(addr, mapped, 12) == 0) {
            memmove(addr, addr + 12, 4);
            *family = 4;
        } else {
            *family = 6;
        }
        return true;
    }
    return false;
}

// The config: {"blocked": [..], "status": N, "message": ".."}. On error,
// writes a message into `err` and returns false.
static bool load_config(const char *text, size_t len, char *err, size_t err_len) {
    json_t j;
    json_init(&j, text, len);
    char key[64], value[512];
    n_nets = 0;
    if (!json_begin_object(&j)) goto fail;
    bool more;
    while (json_next_key(&j, key, sizeof key, &more) && more) {
        if (strcmp(key, "blocked") == 0) {
            if (!json_begin_array(&j)) goto fail;
            bool item;
            while (json_next_item(&j, &item) && item) {
                if (!json_string(&j, value, sizeof value)) goto fail;
                if (n_nets == MAX_NETS) {
                    snprintf(err, err_len, "blocked: more than %d entries", MAX_NETS);
                    return false;
                }
                if (!parse_net(value, &nets[n_nets])) {
                    snprintf(err, err_len, "blocked: \"%s\" is not an address or network (a.b.c.d/n, x::y/n)", value);
                    return false;
                }
                n_nets++;
            }
            if (j.failed) goto fail;
        } else if (strcmp(key, "status") == 0) {
            long long s;
            if (!json_int(&j, &s)) goto fail;
            if (s < 100 || s > 599) {
                snprintf(err, err_len, "status: %lld is not 100..=599", s);
                return false;
            }
            reply_status = (uint16_t)s;
        } else if (strcmp(key, "message") == 0) {
            if (!json_string(&j, reply_message, sizeof reply_message)) goto fail;
        } else {
            snprintf(err, err_len, "unknown config key \"%s\" (expected blocked, status, message)", key);
            return false;
        }
    }
    if (j.failed || !json_end(&j)) goto fail;
    return true;
fail:
    snprintf(err, err_len, "config: %s", j.error[0] ? j.error : "malformed JSON");
    return false;
}

// ---------------------------------------------------------------- exports

bool exports_sluicegate_filter_handler_init(filter_string_t *config,
                                            exports_sluicegate_filter_handler_capabilities_t *ret,
                                            filter_string_t *err) {
    char msg[600];
    bool ok = load_config((const char *)config->ptr, config->len, msg, sizeof msg);
    filter_string_free(config);
    if (!ok) {
        filter_string_dup(err, msg);
        return false;
    }
    ret->request_phase = true;
    ret->response_phase = false;
    ret->request_body = false;
    ret->response_body = false;
    return true;
}

void exports_sluicegate_filter_handler_on_request(exports_sluicegate_filter_handler_borrow_request_head_t req,
                                                  exports_sluicegate_filter_handler_request_action_t *ret) {
    filter_string_t client;
    sluicegate_filter_types_method_request_head_client_addr(req, &client);
    sluicegate_filter_types_request_head_drop_borrow(req);

    int family = 0;
    uint8_t addr[16] = {0};
    bool blocked = false;
    if (parse_client((const char *)client.ptr, client.len, &family, addr)) {
        for (size_t i = 0; i < n_nets && !blocked; i++) blocked = in_net(&nets[i], family, addr);
    }
    filter_string_free(&client);

    if (!blocked) {
        ret->tag = SLUICEGATE_FILTER_TYPES_REQUEST_ACTION_CONTINUE;
        return;
    }
    sluicegate_filter_metrics_counter_add(&(filter_string_t){(uint8_t *)"blocked", 7}, 1);

    ret->tag = SLUICEGATE_FILTER_TYPES_REQUEST_ACTION_RESPOND;
    sluicegate_filter_types_local_response_t *r = &ret->val.respond;
    r->status = reply_status;
    // Owned values handed back to the host: allocated here, freed by the
    // generated post-return function.
    r->headers.len = 1;
    r->headers.ptr = malloc(sizeof *r->headers.ptr);
    filter_string_dup(&r->headers.ptr[0].f0, "content-type");
    filter_string_dup(&r->headers.ptr[0].f1, "text/plain; charset=utf-8");
    size_t n = strlen(reply_message);
    r->body.len = n;
    r->body.ptr = malloc(n ? n : 1);
    memcpy(r->body.ptr, reply_message, n);
}

void exports_sluicegate_filter_handler_on_request_body(exports_sluicegate_filter_handler_borrow_request_head_t req,
                                                       filter_list_u8_t *body,
                                                       exports_sluicegate_filter_handler_body_action_t *ret) {
    sluicegate_filter_types_request_head_drop_borrow(req);
    filter_list_u8_free(body);
    ret->tag = SLUICEGATE_FILTER_TYPES_BODY_ACTION_CONTINUE;
}

void exports_sluicegate_filter_handler_on_response(exports_sluicegate_filter_handler_borrow_request_head_t req,
                                                   exports_sluicegate_filter_handler_borrow_response_head_t resp,
                                                   exports_sluicegate_filter_handler_response_action_t *ret) {
    sluicegate_filter_types_request_head_drop_borrow(req);
    sluicegate_filter_types_response_head_drop_borrow(resp);
    ret->tag = SLUICEGATE_FILTER_TYPES_RESPONSE_ACTION_CONTINUE;
}

void exports_sluicegate_filter_handler_on_response_body(exports_sluicegate_filter_handler_borrow_request_head_t req,
                                                        exports_sluicegate_filter_handler_borrow_response_head_t resp,
                                                        filter_list_u8_t *body,
                                                        exports_sluicegate_filter_handler_body_action_t *ret) {
    sluicegate_filter_types_request_head_drop_borrow(req);
    sluicegate_filter_types_response_head_drop_borrow(resp);
    filter_list_u8_free(body);
    ret->tag = SLUICEGATE_FILTER_TYPES_BODY_ACTION_CONTINUE;
}
