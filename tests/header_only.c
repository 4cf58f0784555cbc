/* The public header alone must compile as strict C11, C99 and C++ (make check-header). */
#include "epmoe.h"

int header_only_probe(void);
int header_only_probe(void) {
    epmoe_status s = EPMOE_OK;
    epmoe_stream_t stream = 0;
    (void)stream;
    return (int)s + EPMOE_VERSION_CODE + (int)sizeof(epmoe_scale_fmt);
}
