// SPDX-License-Identifier: MIT
/*
 * xendmop_edu: the HVM test guest's driver for examples/pci_edu.py (1234:11e8), so that the
 * guest kernel itself enables the device's interrupt and counts it.  With msi=1 (the
 * default) it asks the PCI core for one MSI vector, which writes the MSI capability's
 * address and data through config space and sets its enable bit; with msi=0 it takes the
 * INTx line.  The handler reads BAR0's interrupt status and acknowledges what it read, so
 * /proc/interrupts counts "xendmop_edu" once per interrupt the device raised.  The tests
 * raise interrupts from user space by writing BAR0's raise register through /dev/mem; the
 * driver claims no regions so that stays possible.
 */
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/pci.h>

/* INTx: PCI_IRQ_INTX in newer kernels (6.12 has only that name), PCI_IRQ_LEGACY before. */
#ifndef PCI_IRQ_INTX
#define PCI_IRQ_INTX PCI_IRQ_LEGACY
#endif

#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_ACK 0x64

static bool msi = true;
module_param(msi, bool, 0444);
MODULE_PARM_DESC(msi, "use MSI (default) rather than INTx");

struct edu {
	void __iomem *bar0;
	int irq;
};

static irqreturn_t edu_irq(int irq, void *data)
{
	struct edu *edu = data;
	u32 status = ioread32(edu->bar0 + EDU_IRQ_STATUS);

	if (!status)
		return IRQ_NONE; /* INTx may be shared */
	iowrite32(status, edu->bar0 + EDU_IRQ_ACK);
	return IRQ_HANDLED;
}

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu *edu;
	int err;

	edu = devm_kzalloc(&pdev->dev, sizeof(*edu), GFP_KERNEL);
	if (!edu)
		return -ENOMEM;
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	edu->bar0 = devm_ioremap(&pdev->dev, pci_resource_start(pdev, 0), pci_resource_len(pdev, 0));
	if (!edu->bar0)
		return -ENOMEM;
	err = pci_alloc_irq_vectors(pdev, 1, 1, msi ? PCI_IRQ_MSI : PCI_IRQ_INTX);
	if (err < 0)
		return err;
	edu->irq = pci_irq_vector(pdev, 0);
	err = request_irq(edu->irq, edu_irq, msi ? 0 : IRQF_SHARED, "xendmop_edu", edu);
	if (err) {
		pci_free_irq_vectors(pdev);
		return err;
	}
	pci_set_drvdata(pdev, edu);
	dev_info(&pdev->dev, "xendmop_edu: %s, irq %d\n", msi ? "MSI" : "INTx", edu->irq);
	return 0;
}

static void edu_remove(struct pci_dev *pdev)
{
	struct edu *edu = pci_get_drvdata(pdev);

	free_irq(edu->irq, edu);
	pci_free_irq_vectors(pdev);
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DEVICE(0x1234, 0x11e8) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static struct pci_driver edu_driver = {
	.name = "xendmop_edu",
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
};
module_pci_driver(edu_driver);

MODULE_DESCRIPTION("xendmop lab: guest driver for examples/pci_edu.py");
MODULE_LICENSE("Dual MIT/GPL");
