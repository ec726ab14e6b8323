#!/usr/bin/python3
"""A real RTSP server for the stream-camera tests: GStreamer's RTSP server library
(Debian: gir1.2-gst-rtsp-server-1.0, python3-gi, gstreamer1.0-plugins-good/-base) serving
one JPEG, looped at 5 fps, as RTP/JPEG on rtsp://127.0.0.1:PORT/cam, with HTTP basic
authentication when a user and password are given.

    rtsp_server.py PORT IMAGE [USER PASSWORD]

Prints "ready" on stdout once it listens. Debian's python3 (/usr/bin/python3): the
GObject bindings are a Debian package, not a PyPI one.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main():
    port, image = sys.argv[1], sys.argv[2]
    creds = sys.argv[3:5]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    # Decoded and encoded again so any JPEG (progressive, odd subsampling) becomes one
    # RTP/JPEG can carry.
    factory.set_launch(
        f'( multifilesrc location="{image}" loop=true caps="image/jpeg,framerate=5/1" '
        "! jpegdec ! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=90 "
        "! rtpjpegpay name=pay0 pt=26 )"
    )
    factory.set_shared(True)
    if creds:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(*creds), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        role = Gst.Structure.new_empty("viewer")
        role.set_value("media.factory.access", True)
        role.set_value("media.factory.construct", True)
        permissions.add_role_from_structure(role)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
