/*
 * change-backing-file: rewrites the backing file name an image's header records
 * (not the graph), for an image in the chain of a root node, as QEMU 7.2 does:
 * a read-only image is made writable for the header write and read-only again.
 */
import { genericError } from '../errors.js';
import { checkNotBlocked, lookupRootNode, type BlockLayer } from './block-layer.js';
import { describeErrno } from './io-error.js';
import type { BlockNode } from './node.js';

function inChain(top: BlockNode, image: BlockNode): boolean {
  for (let node: BlockNode | undefined = top; node; node = node.below()) if (node === image) return true;
  return false;
}

export async function changeBackingFile(layer: BlockLayer, args: { device: string; 'image-node-name': string; 'backing-file': string }): Promise<void> {
  const { graph } = layer;
  const device = lookupRootNode(graph, args.device);
  const image = graph.find(args['image-node-name']);
  if (!image) throw genericError(`Cannot find device='' nor node-name='${args['image-node-name']}'`);
  if (!image.below()) throw genericError('not allowing backing file change on an image without a backing file');
  checkNotBlocked(layer.blockers, device, 'change');
  if (!inChain(device, image)) throw genericError(`'${args.device}' and image file are not in the same chain`);
  const wasReadOnly = image.readOnly;
  if (wasReadOnly) await graph.reopenReadWrite(image);
  try {
    if (!image.state.changeBackingFile) throw Object.assign(new Error('not supported'), { code: 'ENOTSUP' });
    // QEMU records the image's own format as the backing format here.
    await image.drained(() => image.state.changeBackingFile!(args['backing-file'], image.driver.name));
  } catch (error) {
    const code = (error as { code?: string }).code;
    throw genericError(`Could not change backing file to '${args['backing-file']}': ${code ? describeErrno(code) : (error as Error).message}`);
  } finally {
    if (wasReadOnly) await graph.reopenReadOnly(image).catch((error: unknown) => graph.log.warn({ err: error, node: image.name }, 'could not make the image read-only again'));
  }
}
