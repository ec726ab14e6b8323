/* Set a V4L2 control, for the VM test (busybox has no v4l2-ctl):
 *   v4l2-ctl NODE NAME|0xID VALUE
 * NAME is matched case-insensitively as a substring of the control's name, or the control
 * is given by its id; a button control is pressed (VALUE ignored). With no match, every
 * control is listed and the exit status is 1. Built static by tests/vm/run.sh. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <linux/videodev2.h>

static int contains(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s NODE NAME VALUE\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDWR | O_NONBLOCK);
    if (fd < 0) { perror(argv[1]); return 2; }
    int by_id = strncmp(argv[2], "0x", 2) == 0;
    unsigned id = by_id ? (unsigned)strtoul(argv[2], NULL, 16) : 0;
    struct v4l2_queryctrl q = { .id = V4L2_CTRL_FLAG_NEXT_CTRL };
    while (ioctl(fd, VIDIOC_QUERYCTRL, &q) == 0) {
        int match = by_id ? q.id == id : contains((const char *)q.name, argv[2]);
        if (!(q.flags & V4L2_CTRL_FLAG_DISABLED) && match) {
            struct v4l2_control c = { .id = q.id, .value = atoi(argv[3]) };
            if (ioctl(fd, VIDIOC_S_CTRL, &c) != 0) { perror((const char *)q.name); return 1; }
            printf("v4l2-ctl: %s: %s = %d\n", argv[1], q.name, c.value);
            return 0;
        }
        q.id |= V4L2_CTRL_FLAG_NEXT_CTRL;
    }
    fprintf(stderr, "v4l2-ctl: %s: no control named like \"%s\"; it has:\n", argv[1], argv[2]);
    struct v4l2_queryctrl l = { .id = V4L2_CTRL_FLAG_NEXT_CTRL };
    while (ioctl(fd, VIDIOC_QUERYCTRL, &l) == 0) {
        fprintf(stderr, "  0x%08x %s\n", l.id, l.name);
        l.id |= V4L2_CTRL_FLAG_NEXT_CTRL;
    }
    return 1;
}
