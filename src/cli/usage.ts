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

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver specific parameters>...]
                         configure a block backend (blockdev-add; JSON accepted)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<description>]
           [,allocation-depth=on|off][,writethrough=on|off]
                         export the specified block node over NBD
                         (block-export-add; needs --nbd-server before it)

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes
                         (nbd-server-start)

  --object throttle-group,id=<id>[,limits.<limit>=<value>...]
  --object tls-creds-x509,id=<id>,dir=<dir>[,endpoint=client|server]
           [,verify-peer=on|off][,sanity-check=on|off][,priority=<prio>]
  --object tls-creds-psk,id=<id>,dir=<dir>[,endpoint=client|server]
           [,username=<name>]
  --object authz-simple,id=<id>,identity=<x509 distinguished name>
                         create a QOM object (object-add)

Without --monitor or --qmp, blockd serves QMP on ./blockd-qmp.sock.
`;
