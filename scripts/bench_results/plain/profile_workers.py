"""py-spy record of the kit's and the stock handler's resnet18 workers under the same load (c=16)."""
import subprocess, sys, threading, collections, re
from pathlib import Path
sys.path[:0] = ["handlers", "scripts"]
import demo_models
from client import KeyRing, RestClient
from loadgen import closed_loop
from tsctl import Keys, TorchServe, derive_config, random_endpoints, worker_pids
from bench import link_store

images = {"451x300": demo_models.encode(demo_models.sample_photos(("chelsea",))["chelsea"], "JPEG", quality=90),
          "640x480": demo_models.user_image("photo_640x480.jpg")}
work = Path("build/profile"); work.mkdir(parents=True, exist_ok=True)
archives = ["resnet18", "resnet18_stock"]
ep = random_endpoints()
config = derive_config(Path("config.properties"), work / "config.properties", ep.properties())
server = TorchServe(work, config, link_store(archives, work / "store"), [f"{a}={a}.mar" for a in archives])
server.start()
CATEGORIES = [
    ("JPEG decode (PIL)", re.compile(r"PIL|decode_image|draft|ImageFile|Image\.open|_open")),
    ("resize / crop / normalize", re.compile(r"resize|center_crop|interpolate|normalize|to_tensor|classifier_batch|classifier_crop|ToTensor|pil_to_tensor")),
    ("IPC / protocol (TorchServe)", re.compile(r"otf_message|recv|sendall|socket|retrieve_msg|create_predict|encode_response")),
    ("model (torch ops)", re.compile(r"conv|linear|batch_norm|relu|max_pool|adaptive|addmm|forward|_call_impl")),
]
try:
    keys = server.wait_ready(archives, timeout=300)
    rest = RestClient(server.endpoints, KeyRing(work / "key_file.json"))
    for label, body in images.items():
        for name in archives:
            pid = worker_pids(server.endpoints, Keys.read(work / "key_file.json"), name)[0]
            out = work / f"{name}_{label}.txt"
            load = threading.Thread(target=lambda: closed_loop(lambda i: rest.predict(name, body).status, concurrency=16, seconds=14, warmup=2))
            load.start()
            subprocess.run([".venv/bin/py-spy", "record", "-p", str(pid), "-d", "10", "-r", "50", "-f", "raw", "-o", str(out), "--nonblocking", "--threads"], check=True, capture_output=True)
            load.join()
            totals = collections.Counter()
            threads = set()
            for line in out.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                frames = stack.split(";")
                threads.add(frames[0])
                leafish = ";".join(frames[-6:])
                cat = next((c for c, rx in CATEGORIES if rx.search(leafish)), "other (waiting, Python glue)")
                totals[cat] += int(count)
            total = sum(totals.values())
            print(f"{name} {label}: {len(threads)} threads sampled; " + ", ".join(f"{c} {100*v/total:.0f}%" for c, v in totals.most_common()))
finally:
    server.stop()
