/*
 * QMP on the daemon's own stdin/stdout (`--chardev stdio,id=X --monitor X`),
 * for scripts that pipe commands in. As in qemu-storage-daemon, EOF on stdin
 * ends the session but not the daemon.
 */
import type { Connection } from '../session.js';
import type { AcceptConnection, Listener } from './stream-listener.js';

export function serveStdio(accept: AcceptConnection): Listener {
  const connection: Connection = {
    description: 'stdio',
    write: (text) => {
      process.stdout.write(text);
    },
    pause: () => process.stdin.pause(),
    resume: () => process.stdin.resume(),
    close: () => process.stdin.pause(),
  };
  const handlers = accept(connection);
  const onData = (chunk: Buffer) => handlers.receive(chunk);
  const onEnd = () => handlers.endOfInput();
  process.stdin.on('data', onData);
  process.stdin.on('end', onEnd);
  process.stdout.on('error', () => handlers.close());
  return {
    address: 'stdio',
    close: async () => {
      process.stdin.off('data', onData);
      process.stdin.off('end', onEnd);
      process.stdin.pause();
      handlers.close();
    },
  };
}
