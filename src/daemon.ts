/*
 * Composition root: builds the event bus, the command registry, the QMP
 * server, and wires them together. No logic of its own beyond start-up and
 * an orderly, once-only shutdown.
 */
import type { Logger } from 'pino';
import { BlockGraph } from './blockdev/graph.js';
import { registerBlockCommands } from './blockdev/commands.js';
import { NodeOpener } from './blockdev/node-opener.js';
import { nativeAddonMissing } from './blockdev/native/native-file-ops.js';
import { EventBus } from './event-bus.js';
import { MainLoopLock } from './main-loop-lock.js';
import { NbdService, registerExportCommands } from './exports/commands.js';
import { ExportRegistry } from './exports/export-registry.js';
import { registerJobCommands } from './jobs/commands.js';
import { registerCreateCommand } from './jobs/create-job.js';
import { JobRegistry } from './jobs/job-registry.js';
import type { BlockLayer } from './blockdev/block-layer.js';
import { registerCommitCommand } from './jobs/commit-job.js';
import { registerDriveMirrorCommand } from './jobs/drive-mirror.js';
import { registerMirrorCommands } from './jobs/mirror-command.js';
import { registerStreamCommand } from './jobs/stream-job.js';
import { OpBlockers } from './opblockers/op-blockers.js';
import { registerObjectCommands } from './objects/commands.js';
import { ObjectRegistry } from './objects/object-registry.js';
import { CommandRegistry } from './qmp/command-registry.js';
import { registerControlCommands } from './qmp/control-commands.js';
import { QmpServer, type MonitorOptions } from './qmp/server.js';
import type { Listener } from './qmp/transports/stream-listener.js';
import { registerTransactionCommands } from './transactions/transaction-command.js';
import { versionInfo } from './version.js';
import type { JsonObject, JsonValue } from './json/value.js';

export class Daemon {
  readonly bus = new EventBus();
  readonly registry = new CommandRegistry();
  /** Commands, job ends and the shutdown run one at a time, as in QEMU's main loop. */
  readonly lock = new MainLoopLock();
  readonly qmp: QmpServer;
  readonly graph: BlockGraph;
  readonly opener: NodeOpener;
  readonly objects = new ObjectRegistry();
  readonly exports: ExportRegistry;
  readonly jobs: JobRegistry;
  readonly blockers = new OpBlockers();
  readonly nbd: NbdService;
  private readonly shutdownHooks: (() => void | Promise<void>)[] = [];
  private stopping: Promise<void> | undefined;
  /** A daemon runs until told to stop, even when no socket or client keeps the event loop busy (stdio after EOF). */
  private readonly keepAlive = setInterval(() => {}, 1 << 30);

  constructor(readonly log: Logger) {
    registerControlCommands(this.registry, { stopServices: () => this.stopServices(), shutdown: (reason) => void this.shutdown(reason) });
    this.graph = new BlockGraph(log.child({ component: 'graph' }), this.bus);
    this.opener = new NodeOpener(this.graph, log.child({ component: 'graph' }), this.objects);
    this.jobs = new JobRegistry(this.bus, { lock: this.lock, log: log.child({ component: 'jobs' }) });
    const blockLayer: BlockLayer = { graph: this.graph, opener: this.opener, blockers: this.blockers };
    registerBlockCommands(this.registry, blockLayer);
    registerObjectCommands(this.registry, this.objects);
    this.exports = new ExportRegistry(this.graph, this.bus, log.child({ component: 'exports' }));
    const exportLayer = { ...blockLayer, exports: this.exports, log, findObject: (id: string) => this.objects.find(id) };
    this.nbd = new NbdService(exportLayer);
    registerExportCommands(this.registry, exportLayer, this.nbd);
    registerJobCommands(this.registry, this.jobs);
    registerCreateCommand(this.registry, blockLayer, this.jobs);
    registerStreamCommand(this.registry, blockLayer, this.jobs);
    registerCommitCommand(this.registry, blockLayer, this.jobs);
    registerMirrorCommands(this.registry, blockLayer, this.jobs);
    registerDriveMirrorCommand(this.registry, blockLayer, this.jobs);
    registerTransactionCommands(this.registry, blockLayer, { jobs: this.jobs, log: log.child({ component: 'transaction' }) });
    this.qmp = new QmpServer({ registry: this.registry, log, version: versionInfo, lock: this.lock });
    this.bus.subscribe((event) => this.qmp.broadcast(event));
    if (nativeAddonMissing !== undefined) {
      log.warn({ reason: nativeAddonMissing }, 'native addon not loaded: no image locking, so file nodes open only with locking=off and image files are created without seeing other users\' locks');
    }
    const missing = this.registry.missingHandlers();
    if (missing.length) throw new Error(`schema commands without a handler: ${missing.join(', ')}`);
  }

  /** Runs a command outside any QMP session, as command-line options like --blockdev do (a section of the lock, as any command). */
  runCommand(name: string, args: JsonObject): Promise<JsonValue> {
    const session = {
      id: 0,
      negotiated: true,
      negotiate: () => {
        throw new Error('no session');
      },
    };
    return this.lock.run(() => this.registry.call(name, args, { session, log: this.log, commandLog: (command) => this.log.child({ cmd: command }) }));
  }

  addMonitor(options: MonitorOptions): Promise<Listener> {
    return this.qmp.listen(options);
  }

  /** Runs after the daemon has stopped serving (pid file removal, process exit). */
  onShutdown(hook: () => void | Promise<void>): void {
    this.shutdownHooks.push(hook);
  }

  /** Closes every node, users before what they use, so images are flushed and consistent; one that fails is logged and left. */
  private async closeAllNodes(): Promise<void> {
    const failed = new Set<string>();
    for (;;) {
      const top = this.graph.list().find((node) => node.parents.length === 0 && !failed.has(node.name));
      if (!top) break;
      await this.graph.close(top).catch((error: unknown) => {
        failed.add(top.name);
        this.log.error({ err: error, node: top.name }, 'closing node failed');
      });
    }
  }

  /**
   * As qemu-storage-daemon on its way out: the exports end, then the jobs are cancelled and
   * dismissed (their events still reach the clients), then the NBD server stops.
   */
  private async stopServices(): Promise<void> {
    await this.jobs.lettingJobsEnd(this.exports.closeAll());
    await this.jobs.cancelAll();
    if (this.nbd.server) await this.nbd.stop();
  }

  /**
   * Stops the daemon once, in a section of the lock: a command or a job's end under way
   * finishes first, and none starts after. Each step that fails is logged and the next one
   * still runs, so the images are closed whatever happened before.
   */
  shutdown(reason: string): Promise<void> {
    const step = async (name: string, work: () => Promise<void>) => {
      await work().catch((error: unknown) => this.log.error({ err: error, step: name }, 'shutdown step failed'));
    };
    this.stopping ??= this.lock.run(async () => {
      this.log.info({ reason }, 'shutting down');
      clearInterval(this.keepAlive);
      await step('stop services', () => this.stopServices());
      await step('close monitors', () => this.qmp.close());
      await step('close nodes', () => this.closeAllNodes());
      for (const hook of this.shutdownHooks) await step('shutdown hook', async () => hook());
    });
    return this.stopping;
  }
}
