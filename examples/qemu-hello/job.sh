# Runs inside the guest, in /job (the job directory, shared over virtio-9p).
echo "$GREETING"
echo "kernel $(uname -r) on $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
mkdir -p out
uname -a > out/uname.txt
cat /proc/cpuinfo | grep -m1 'model name' >> out/uname.txt
echo "wrote out/uname.txt"
