#!/usr/bin/env python3
# TCP proxy adding a fixed delay to each burst of bytes in each direction: remote-storage latency on loopback,
# where tc netem is not available. usage: lagproxy.py LISTEN_PORT TARGET_PORT DELAY_MS
import asyncio, sys, time
LPORT, RPORT, DELAY = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
async def pipe(r, w):
    try:
        while True:
            data = await r.read(1 << 16)
            if not data:
                break
            await asyncio.sleep(DELAY)
            w.write(data)
            await w.drain()
            # drain what is already buffered without further delay (one delay per burst)
            while True:
                try:
                    more = await asyncio.wait_for(r.read(1 << 16), timeout=0.0005)
                except asyncio.TimeoutError:
                    break
                if not more:
                    w.close(); return
                w.write(more); await w.drain()
    except Exception:
        pass
    finally:
        try: w.close()
        except Exception: pass
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection('127.0.0.1', RPORT)
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
async def main():
    srv = await asyncio.start_server(handle, '127.0.0.1', LPORT)
    async with srv: await srv.serve_forever()
asyncio.run(main())
