// A Sluicegate filter in C: copy this folder, rename it, edit.
//
// It sets `x-hello: world` on the request and `x-filter: c` on the
// response. For a filter with a config, see filters/c-blocklist (it parses
// the JSON config with the small reader in its json.h).
//
// The bindings (filter.h, filter.c, filter_component_type.o) are generated
// by `wit-bindgen c wit --world filter`; scripts/build-lang-filters.sh does
// that, compiles with clang for wasm32-wasi and wraps the module into a
// component with `wasm-tools component new`.
//
// Two rules of the C bindings:
// - every borrowed handle the host passes in (`req`, `resp`) must be dropped
//   with `*_drop_borrow` before the function returns, or the call traps;
// - arguments are owned by the callee (free them: `filter_string_free`,
//   `filter_list_u8_free`), and what you return is freed by the bindings.

#include <stdbool.h>
#include <string.h>

#include "filter.h"

static filter_string_t str(const char *s) {
    return (filter_string_t){(uint8_t *)s, strlen(s)};
}

bool exports_sluicegate_filter_handler_init(filter_string_t *config,
                                            exports_sluicegate_filter_handler_capabilities_t *ret,
                                            filter_string_t *err) {
    filter_string_free(config);
    filter_string_t msg = str("c filter ready");
    sluicegate_filter_log_write(SLUICEGATE_FILTER_TYPES_LOG_LEVEL_INFO, &msg);
    ret->request_phase = true;
    ret->response_phase = true;
    ret->request_body = false;
    ret->response_body = false;
    return true;  // or: filter_string_dup(err, "why"); return false;
}

void exports_sluicegate_filter_handler_on_request(exports_sluicegate_filter_handler_borrow_request_head_t req,
                                                  exports_sluicegate_filter_handler_request_action_t *ret) {
    filter_string_t name = str("x-hello"), value = str("world"), err;
    if (!sluicegate_filter_types_method_request_head_set_header(req, &name, &value, &err)) {
        filter_string_free(&err);
    }
    sluicegate_filter_types_request_head_drop_borrow(req);
    ret->tag = SLUICEGATE_FILTER_TYPES_REQUEST_ACTION_CONTINUE;
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
    filter_string_t name = str("x-filter"), value = str("c"), err;
    if (!sluicegate_filter_types_method_response_head_set_header(resp, &name, &value, &err)) {
        filter_string_free(&err);
    }
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
