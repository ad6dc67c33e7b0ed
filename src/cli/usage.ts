/* The --help text: qemu-storage-daemon's options as blockd accepts them, plus blockd's own. */
export const USAGE = `Usage: blockd [options]
blockd, a block-storage daemon speaking QMP (compatible with qemu-storage-daemon)

  -h, --help             display this help and exit
  -V, --version          output version information and exit
  -T, --trace <pattern>  accepted for compatibility; use --log-level trace

  --chardev socket,id=<id>,path=<path>,server=on[,wait=off]
  --chardev socket,id=<id>[,host=<host>],port=<port>,server=on[,wait=off]
  --chardev stdio,id=<id>
                         configure a character device for a QMP monitor
                         (TCP binds 127.0.0.1 unless host= says otherwise;
                         without wait=off, startup waits for a first client)

  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP on a chardev; every monitor accepts any
                         number of clients at once

  --qmp unix:<path> | tcp:<host>:<port> | ws:<host>:<port>[,pretty=on]
                         serve QMP on a UNIX socket, TCP or WebSocket
                         (short form of --chardev + --monitor; repeatable)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete
  --pidfile <path>       write process ID to a file after startup
  --log-level <level>    fatal, error, warn, info (default), debug, trace or
                         silent; also BLOCKD_LOG_LEVEL. Logs are JSON on stderr

  --blockdev, --export, --nbd-server, --object
                         qemu-storage-daemon options that this version of
                         blockd does not support yet (refused with a message)

Without --monitor or --qmp, blockd serves QMP on ./blockd-qmp.sock.
`;
